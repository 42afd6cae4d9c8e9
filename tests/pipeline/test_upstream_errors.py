"""vLLM's rejections (as vLLM 0.32 words them) become the guard's own, naming no model fact."""

from __future__ import annotations

import re

import orjson
import pytest

from guard_server.openai_fields import Endpoint
from guard_server.pipeline.upstream_errors import client_error

CHAT, COMPLETIONS = Endpoint.CHAT, Endpoint.COMPLETIONS
LEAKS = re.compile(r"\d{2,}|vocab|max_model_len|context length|vllm|--|validation error", re.I)


def _vllm(message: str, param: str | None = None, status: int = 400) -> bytes:
    error = {"message": message, "type": "BadRequestError", "param": param, "code": status}
    return orjson.dumps({"error": error})


# (endpoint, vLLM's message, vLLM's param, the client's param, the guard's code), captured
# from the bundled teacher on vLLM 0.32 (vocabulary 512, context 256, --max-logprobs 20).
CASES = [
    (COMPLETIONS, "token_id(s) [999999] in stop_token_ids contain out-of-vocab token ids. "
     "Vocabulary size: 512 (parameter=stop_token_ids, value=[999999])", "stop_token_ids",
     "stop_token_ids", "invalid_token_id"),
    (COMPLETIONS, "token_id(s) [999999] in logit_bias contain out-of-vocab token ids. "
     "Vocabulary size: 512 (parameter=logit_bias, value=[999999])", "logit_bias",
     "logit_bias", "invalid_token_id"),
    (COMPLETIONS, "Token id 99999 is out of vocabulary", None, "prompt", "invalid_token_id"),
    (CHAT, "This model's maximum context length is 256 tokens. However, your prompt contains "
     "at least 257 input tokens, which exceeds this limit even without any output tokens. "
     "Please reduce the length of the input prompt. (parameter=input_tokens, value=257)",
     "input_tokens", "messages", "context_length_exceeded"),
    (COMPLETIONS, "max_tokens=1000 cannot be greater than max_model_len=256. Please request "
     "fewer output tokens. (parameter=max_tokens, value=1000)", "max_tokens", "max_tokens",
     "context_length_exceeded"),
    (COMPLETIONS, "truncate_prompt_tokens=1000 cannot be greater than max_model_len = 256. "
     "Please request a smaller truncation size. (parameter=truncate_prompt_tokens, "
     "value=1000)", "truncate_prompt_tokens", "truncate_prompt_tokens",
     "context_length_exceeded"),
    (CHAT, "Requested sample logprobs of 50, which is greater than max allowed: 20 "
     "(parameter=logprobs, value=50)", "logprobs", "top_logprobs", "value_out_of_range"),
    (COMPLETIONS, "Requested sample logprobs of 50, which is greater than max allowed: 20 "
     "(parameter=logprobs, value=50)", "logprobs", "logprobs", "value_out_of_range"),
    (CHAT, "1 validation error:\n  {'type': 'bool_parsing', 'loc': "
     "'body.stream_options.include_usage', 'msg': 'Input should be a valid boolean', "
     "'input': 'maybe'}", "body.stream_options.include_usage",
     "stream_options.include_usage", "invalid_value"),
    (CHAT, "6 validation errors:\n  {'type': 'literal_error', 'loc': "
     "'body.response_format.type', 'msg': \"Input should be 'text', 'json_object' or "
     "'json_schema'\", 'input': 'bogus'}", "body.response_format.type",
     "response_format.type", "invalid_value"),
    (CHAT, "n must be 1 when using greedy sampling, got 2.", None, "n", "invalid_value"),
    (CHAT, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
     "be set", None, "tool_choice", "invalid_value"),
    (CHAT, "teacher-internal-name is not a multimodal model", None, "messages",
     "invalid_value"),
    (CHAT, 'Grammar error: at 1(8): invalid regex "((" (in regex): regex parse error', None,
     "structured_outputs", "invalid_value"),
    (CHAT, "Something new in vLLM 0.33 about /opt/vllm/engine.py", None, None,
     "upstream_rejected"),
    (CHAT, "Something new about top_k", "top_k", "top_k", "upstream_rejected"),
    (CHAT, "Something about an internal knob", "internal_knob", None, "upstream_rejected"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "message", "param", "client_param", "code"), CASES)
def test_rejections_are_worded_by_the_guard(
    endpoint: Endpoint, message: str, param: str | None, client_param: str | None, code: str
) -> None:
    error = client_error(endpoint, "teacher", {}, _vllm(message, param), 400)
    assert (error.status, error.param, error.code) == (400, client_param, code)
    assert not LEAKS.search(error.message), error.message
    assert "teacher-internal-name" not in error.message


def test_max_completion_tokens_is_named_as_the_client_sent_it() -> None:
    raw = _vllm("max_tokens=999 cannot be greater than max_model_len=256.", "max_tokens")
    error = client_error(CHAT, "teacher", {"max_completion_tokens": 999}, raw, 400)
    assert error.param == "max_completion_tokens" and "max_completion_tokens" in error.message


def test_an_unknown_model_is_the_guards_404_for_the_public_name() -> None:
    raw = _vllm("The model `served-name` does not exist. Valid aliases: served-name.", "model", 404)
    error = client_error(CHAT, "public-name", {}, raw, 404)
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "served-name" not in error.message and "public-name" in error.message


def test_bodies_that_are_not_vllms_shape_still_get_the_generic_wording() -> None:
    for raw in (b"Internal details: /srv/app.py", b"", b'{"detail": "x"}', b"[1, 2]"):
        error = client_error(COMPLETIONS, "teacher", {}, raw, 422)
        assert error.status == 400 and error.code == "upstream_rejected"
        assert "srv" not in error.message
