"""``/v1/embeddings`` with the official SDK, through a real guard, in front of real vLLM serving
the bundled teacher as an embedding model (``--convert embed``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.teacher import EMBEDDING_MODEL_NAME, SERVED_MODEL_NAME
from guard_server.testing import (
    ALICE_KEY,
    DEMO_KEY,
    TEST_POLICIES,
    TRUSTED_KEY,
    GuardProcess,
    metric_value,
    write_test_config,
)

LIMITED_KEY = "sk-test-embed-limited"
LIMIT_RPM = 8
TEXTS = ["What is 155 + 19?", "Sum 37 and 33.", "Compute 155+802"]


@pytest.fixture(scope="module")
def embed_guard(embedding_vllm_url: str, vllm_url: str, artifacts: Path) -> Iterator[GuardProcess]:
    """A guard in front of the teacher (chat) and the teacher as an embedding model, with the
    suite's policies, a default-tier client limited to a few requests a minute, and an audit
    log."""
    directory = artifacts / "embed-guard"
    directory.mkdir()
    limited = {"tier": "default", "keys": [hash_key(LIMITED_KEY)],
               "limits": {"requests_per_minute": LIMIT_RPM}}  # fmt: skip
    (directory / "limited.yaml").write_text(yaml.safe_dump({"clients": {"limited": limited}}))
    config = write_test_config(
        directory,
        [vllm_url],
        policies=[*TEST_POLICIES, directory / "limited.yaml"],
        upstreams={EMBEDDING_MODEL_NAME: {"urls": [embedding_vllm_url]}},
        audit={"path": str(directory / "audit.jsonl")},
    )
    with GuardProcess(config, directory / "guard.log") as guard:
        yield guard


def _sdk(guard: GuardProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def _vectors(reply: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.asarray([item.embedding for item in sorted(reply.data, key=lambda d: d.index)])


@pytest.fixture(scope="module")
def true_vectors(embedding_vllm_url: str) -> np.ndarray:
    """What vLLM itself returns for TEXTS (floats)."""
    direct = openai.OpenAI(base_url=embedding_vllm_url + "/v1", api_key="-", max_retries=0)
    model = direct.models.list().data[0].id
    return _vectors(direct.embeddings.create(model=model, input=TEXTS, encoding_format="float"))


def test_the_trusted_tier_gets_vllms_vectors_exactly(
    embed_guard: GuardProcess, true_vectors: np.ndarray
) -> None:
    client = _sdk(embed_guard, TRUSTED_KEY)
    floats = client.embeddings.create(
        model=EMBEDDING_MODEL_NAME, input=TEXTS, encoding_format="float"
    )
    assert floats.model == EMBEDDING_MODEL_NAME and floats.object == "list"
    assert np.array_equal(_vectors(floats), true_vectors)
    assert floats.usage.prompt_tokens > 0
    # the SDK's default: base64, decoded by the SDK (little-endian float32)
    encoded = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS)
    assert np.array_equal(_vectors(encoded), true_vectors.astype(np.float32))


def test_the_default_tier_gets_keyed_noise_per_client_and_input(
    embed_guard: GuardProcess, true_vectors: np.ndarray
) -> None:
    demo, alice = _sdk(embed_guard, DEMO_KEY), _sdk(embed_guard, ALICE_KEY)
    create = {"model": EMBEDDING_MODEL_NAME, "encoding_format": "float"}
    served = _vectors(demo.embeddings.create(input=TEXTS, **create))
    assert not np.array_equal(served, true_vectors)
    cosines = np.sum(served * true_vectors, axis=1)
    assert np.all(cosines > 0.99) and np.all(cosines < 0.99999)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)  # vLLM's were unit
    # the same input gives the same vector again, alone or in another batch: nothing to average
    again = _vectors(demo.embeddings.create(input=[TEXTS[2], TEXTS[0]], **create))
    assert np.array_equal(again, served[[2, 0]])
    alone = _vectors(demo.embeddings.create(input=TEXTS[1], **create))
    assert np.array_equal(alone[0], served[1])
    # another client of the same tier meets other noise
    other = _vectors(alice.embeddings.create(input=TEXTS, **create))
    assert not np.any(np.all(other == served, axis=1))
    # base64 carries the same vectors, as float32
    encoded = _vectors(demo.embeddings.create(model=EMBEDDING_MODEL_NAME, input=TEXTS))
    assert np.array_equal(encoded, served.astype(np.float32))


def test_token_id_inputs_are_served(embed_guard: GuardProcess) -> None:
    reply = _sdk(embed_guard, DEMO_KEY).embeddings.create(
        model=EMBEDDING_MODEL_NAME, input=[[5, 6, 7], [8, 9]], encoding_format="float"
    )
    assert [item.index for item in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == len(reply.data[1].embedding) > 0


def test_a_list_counts_each_input_in_the_limits(embed_guard: GuardProcess) -> None:
    client = _sdk(embed_guard, LIMITED_KEY)
    raw = client.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL_NAME, input=[f"Sum {i} and {i}." for i in range(LIMIT_RPM)]
    )
    assert raw.headers["x-ratelimit-limit-requests"] == str(LIMIT_RPM)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"  # 8 inputs: 8 requests
    # four more inputs need half a minute of refill
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=["Sum 1 and 2."] * 4)
    assert caught.value.code == "rate_limit_exceeded"


def test_the_metrics_and_audit_log_count_embeddings(embed_guard: GuardProcess) -> None:
    labels = {"tier": "default", "endpoint": "embeddings", "status": "200"}
    before = metric_value(embed_guard.metrics(), "guard_requests_total", **labels)
    reply = _sdk(embed_guard, DEMO_KEY).embeddings.create(
        model=EMBEDDING_MODEL_NAME, input=["Add 1 and 2.", "Add 2 and 3."], user="end-user-7"
    )
    after = metric_value(embed_guard.metrics(), "guard_requests_total", **labels)
    assert after == before + 1
    records = [json.loads(line) for line in (embed_guard.config.parent / "audit.jsonl").open()]
    mine = [r for r in records if r.get("request_id") == reply._request_id]
    assert len(mine) == 1, records[-3:]
    assert mine[0]["endpoint"] == "embeddings" and mine[0]["prompts"] == 2
    assert mine[0]["end_user"] == "end-user-7"


@pytest.mark.parametrize(
    ("key", "extra", "status", "param", "code"),
    [
        # a field the default tier does not allow (@vllm_advanced)
        (DEMO_KEY, {"extra_body": {"add_special_tokens": False}}, 400, "add_special_tokens",
         "parameter_not_allowed"),
        # a field the endpoint does not know (vLLM's own encoding options)
        (TRUSTED_KEY, {"extra_body": {"embed_dtype": "float16"}}, 400, "embed_dtype",
         "unknown_parameter"),
        (DEMO_KEY, {"encoding_format": "bytes"}, 400, "encoding_format", "invalid_value"),
        (DEMO_KEY, {"dimensions": 0}, 400, "dimensions", "invalid_value"),
        # vLLM refuses dimensions for a model without Matryoshka: in the guard's words
        (DEMO_KEY, {"dimensions": 16}, 400, "dimensions", "invalid_value"),
        (DEMO_KEY, {"input": []}, 400, "input", None),
        (DEMO_KEY, {"input": [[5, 6, 99999]]}, 400, "input", "invalid_token_id"),
        (DEMO_KEY, {"input": ["x"] * 257}, 400, "input", "value_out_of_range"),
        (DEMO_KEY, {"model": SERVED_MODEL_NAME}, 400, "model", "model_not_supported"),
        (DEMO_KEY, {"model": "no-such-model"}, 404, "model", "model_not_found"),
        ("sk-nobody", {}, 401, None, None),
    ],
)  # fmt: skip
def test_bad_requests_get_the_guards_own_errors(
    embed_guard: GuardProcess,
    key: str,
    extra: dict,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    request = {"model": EMBEDDING_MODEL_NAME, "input": "What is 1 + 2?", **extra}
    with pytest.raises(openai.APIStatusError) as caught:
        _sdk(embed_guard, key).embeddings.create(**request)
    error = caught.value
    assert error.status_code == status, error.body
    body = error.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    assert body["param"] == param and (code is None or body["code"] == code), body
    for leak in ("Matryoshka", "vocabulary", "BadRequestError", EMBEDDING_MODEL_NAME + "'"):
        assert leak not in body["message"], body
