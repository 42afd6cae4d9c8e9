"""GuardLogitsProcessor on CPU tensors with hand-built batch updates, against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guard_server.defences.hashing import (
    NOISE_WINDOW_BITS,
    is_green,
    noise_row_key,
    noise_table_hash,
    noise_window,
    uniform_from_hash,
)
from guard_server.vllm_plugin import GuardLogitsProcessor, transform

V = 3000
NOISE = {"guard_noise_seed": 11, "guard_noise_sigma": 1.5}
WATERMARK = {"guard_wm_key": 77, "guard_wm_gamma": 0.25, "guard_wm_delta": 2.0}


def _processor() -> GuardLogitsProcessor:
    return GuardLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]


def _update(batch_size: int, removed=(), added=(), moved=()) -> BatchUpdate:
    return BatchUpdate(
        batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved)
    )


def _add(index: int, extra_args: dict | None, prompt: list[int], output: list[int]):
    return (index, SamplingParams(extra_args=extra_args), prompt, output)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _noise(seed: int, step: int, kind: str = "gumbel") -> np.ndarray:
    h = noise_table_hash(noise_window(noise_row_key(seed, step)) + np.arange(V, dtype=np.int64))
    u = uniform_from_hash(h, bits=transform.FLOAT_BITS)
    if kind == "gaussian":
        return torch.special.ndtri(torch.from_numpy(u)).numpy()
    return -np.log(-np.log(u))


def _green(key: int, prev: int, gamma: float = 0.25) -> np.ndarray:
    return is_green(key, prev, np.arange(V, dtype=np.int64), gamma)


def test_without_guarded_requests_apply_returns_the_same_tensor_untouched() -> None:
    processor = _processor()
    assert processor.is_argmax_invariant() is False
    processor.update_state(None)
    processor.update_state(_update(2, added=[_add(0, None, [1], []), _add(1, {"x": 1}, [2], [])]))
    logits = _logits(2)
    before = logits.clone()
    assert processor.apply(logits) is logits
    assert torch.equal(logits, before)


def test_noise_matches_the_reference_and_leaves_other_rows_bit_for_bit() -> None:
    processor = _processor()
    output: list[int] = []
    processor.update_state(
        _update(
            3, added=[_add(0, None, [5], []), _add(1, NOISE, [5], output), _add(2, {}, [5], [])]
        )
    )
    logits = _logits(3)
    before = logits.clone()
    processor.apply(logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    expected = before[1].numpy() + 1.5 * _noise(11, 0)
    np.testing.assert_allclose(logits[1].numpy(), expected, rtol=1e-5, atol=1e-5)

    output.append(42)  # vLLM appends the sampled token in place: the step advances
    logits = before.clone()
    processor.apply(logits)
    np.testing.assert_allclose(
        logits[1].numpy(), before[1].numpy() + 1.5 * _noise(11, 1), atol=1e-5
    )


def test_noise_is_a_pure_function_of_seed_and_step() -> None:
    results = []
    for _ in range(2):
        processor = _processor()
        processor.update_state(_update(1, added=[_add(0, NOISE, [9, 9], [4, 4, 4])]))
        logits = _logits(1)
        processor.apply(logits)
        results.append(logits)
    assert torch.equal(results[0], results[1])
    other = _processor()
    other.update_state(
        _update(1, added=[_add(0, {**NOISE, "guard_noise_seed": 12}, [9], [4, 4, 4])])
    )
    logits = _logits(1)
    other.apply(logits)
    assert not torch.equal(logits, results[0])


def test_gaussian_noise_kind() -> None:
    processor = _processor()
    args = {**NOISE, "guard_noise_kind": "gaussian"}
    processor.update_state(_update(2, added=[_add(0, args, [1], [3]), _add(1, NOISE, [1], [3])]))
    logits = torch.zeros(2, V)
    processor.apply(logits)
    np.testing.assert_allclose(logits[0].numpy(), 1.5 * _noise(11, 1, "gaussian"), atol=1e-4)
    np.testing.assert_allclose(logits[1].numpy(), 1.5 * _noise(11, 1), atol=1e-5)
    assert abs(float(logits[0].mean())) < 0.1 and abs(float(logits[0].std()) - 1.5) < 0.1


def test_noise_steps_are_standard_gumbel_and_uncorrelated() -> None:
    """Every step reads another window of one table: no step repeats another's noise."""
    output: list[int] = []
    processor = _processor()
    args = {"guard_noise_seed": 5, "guard_noise_sigma": 1.0}
    processor.update_state(_update(1, added=[_add(0, args, [1], output)]))
    steps = []
    for _ in range(64):
        logits = torch.zeros(1, V)
        processor.apply(logits)
        steps.append(logits[0].numpy().astype(np.float64))
        output.append(0)
    noise = np.stack(steps)
    assert abs(noise.mean() - np.euler_gamma) < 0.01
    assert abs(noise.std() - math.pi / math.sqrt(6)) < 0.01
    between_steps = np.corrcoef(noise)[~np.eye(len(steps), dtype=bool)]
    assert np.abs(between_steps).max() < 0.1


def test_noise_table_windows_fit_a_production_vocabulary() -> None:
    vocab = 152_064
    table = transform.noise_table(vocab, "cpu")
    length = transform.noise_table_length(vocab)
    assert table.shape == (2 * length - vocab + 1, vocab)
    last_start = (1 << NOISE_WINDOW_BITS) - 1  # the largest noise_window()
    u = uniform_from_hash(
        noise_table_hash(np.arange(last_start, last_start + vocab)), transform.FLOAT_BITS
    )
    np.testing.assert_allclose(table[last_start].numpy(), -np.log(-np.log(u)), atol=1e-5)
    normal = torch.special.ndtri(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(table[length + last_start].numpy(), normal, atol=1e-4)


def test_watermark_adds_delta_exactly_on_the_shared_green_list() -> None:
    processor = _processor()
    output: list[int] = []
    processor.update_state(_update(1, added=[_add(0, WATERMARK, [8, 1234], output)]))
    logits = _logits(1)
    before = logits.clone()
    processor.apply(logits)  # step 0: the previous token is the prompt's last
    green = _green(77, 1234)
    assert 0.2 < green.mean() < 0.3
    np.testing.assert_array_equal(logits[0].numpy(), before[0].numpy() + np.float32(2.0) * green)
    output.extend([5, 17])
    logits = before.clone()
    processor.apply(logits)
    np.testing.assert_array_equal(
        logits[0].numpy(), before[0].numpy() + np.float32(2.0) * _green(77, 17)
    )


def _finite(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_top_k_keeps_exactly_k_even_with_ties() -> None:
    processor = _processor()
    processor.update_state(
        _update(
            2, added=[_add(0, {"guard_top_k": 5}, [1], []), _add(1, {"guard_top_k": 50}, [1], [])]
        )
    )
    logits = torch.zeros(2, V)
    logits[0, :3] = 10.0  # three clear winners, then a tie of 2997 tokens for two places
    top50 = _logits(1)[0]
    logits[1] = top50
    processor.apply(logits)
    kept = _finite(logits[0])
    assert len(kept) == 5 and {0, 1, 2} <= kept
    assert _finite(logits[1]) == set(top50.topk(50).indices.tolist())
    assert torch.equal(logits[1][torch.isfinite(logits[1])], top50[torch.isfinite(logits[1])])


def _nucleus(row: np.ndarray, p: float) -> set[int]:
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    ahead = np.cumsum(probs) - probs
    return set(order[ahead < p].tolist())


def test_top_p_keeps_the_smallest_nucleus() -> None:
    processor = _processor()
    processor.update_state(
        _update(
            2,
            added=[_add(0, {"guard_top_p": 0.7}, [1], []), _add(1, {"guard_top_p": 1e-6}, [1], [])],
        )
    )
    logits = _logits(2, seed=3)
    rows = logits.numpy().copy()
    processor.apply(logits)
    assert _finite(logits[0]) == _nucleus(rows[0], 0.7)
    assert _finite(logits[1]) == {int(rows[1].argmax())}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    processor = _processor()
    processor.update_state(_update(1, added=[_add(0, {"guard_min_p": 0.1}, [1], [])]))
    logits = _logits(1, seed=4)
    row = logits[0].numpy().copy()
    processor.apply(logits)
    assert _finite(logits[0]) == set(np.nonzero(row >= row.max() + math.log(0.1))[0].tolist())


def test_bounds_apply_after_noise_and_watermark_in_order() -> None:
    args = {**NOISE, **WATERMARK, "guard_top_k": 30, "guard_min_p": 0.02, "guard_top_p": 0.8}
    processor = _processor()
    processor.update_state(_update(1, added=[_add(0, args, [1], [6])]))
    logits = _logits(1, seed=5)
    row = logits[0].numpy().astype(np.float64) + 1.5 * _noise(11, 1) + 2.0 * _green(77, 6)
    processor.apply(logits)
    top30 = np.argsort(-row)[:30]
    cut = np.full(V, -np.inf)
    cut[top30] = row[top30]
    cut[cut < cut.max() + math.log(0.02)] = -np.inf
    assert _finite(logits[0]) == _nucleus(cut, 0.8)
    finite = torch.isfinite(logits[0]).numpy()
    np.testing.assert_allclose(logits[0].numpy()[finite], row[finite], rtol=1e-5, atol=1e-4)


def _row_seeds(processor: GuardLogitsProcessor, batch: int) -> list[int | None]:
    """Which noise seed each row got, read back from the logits (None: row untouched)."""
    logits = torch.zeros(batch, V)
    processor.apply(logits)
    seeds: list[int | None] = []
    for row in logits.numpy():
        if not row.any():
            seeds.append(None)
            continue
        seed = next(s for s in range(1, 10) if np.allclose(row, _noise(s, 0), atol=1e-5))
        seeds.append(seed)
    return seeds


def _seeded(seed: int) -> dict:
    return {"guard_noise_seed": seed, "guard_noise_sigma": 1.0}


def test_batch_updates_follow_removes_adds_moves_and_swaps() -> None:
    processor = _processor()
    processor.update_state(
        _update(4, added=[_add(i, _seeded(i + 1) if i != 2 else None, [0], []) for i in range(4)])
    )
    assert _row_seeds(processor, 4) == [1, 2, None, 4]
    # Request in row 1 finishes; a new plain request takes row 1; row 3 then moves down to 2.
    processor.update_state(_update(3, removed=[1], added=[_add(1, None, [0], [])]))
    processor.update_state(
        _update(3, removed=[2], moved=[(3, 2, MoveDirectionality.UNIDIRECTIONAL)])
    )
    assert _row_seeds(processor, 3) == [1, None, 4]
    processor.update_state(_update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert _row_seeds(processor, 3) == [4, None, 1]
    processor.update_state(_update(3, moved=[(1, 2, MoveDirectionality.SWAP)]))
    assert _row_seeds(processor, 3) == [4, 1, None]
    # A guarded request re-added into a row replaces what was there; a plain one clears it.
    processor.update_state(_update(3, added=[_add(2, _seeded(7), [0], []), _add(0, {}, [0], [])]))
    assert _row_seeds(processor, 3) == [None, 1, 7]
    processor.update_state(_update(0, removed=[2, 1]))
    assert processor.requests == {}


def test_chunked_and_scattered_rows_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    args = {**NOISE, **WATERMARK, "guard_top_k": 40, "guard_top_p": 0.9}
    added = [_add(i, args if i % 3 else None, [i], [i, i + 1]) for i in range(9)]
    results = []
    for chunk in (transform.CHUNK_ELEMENTS, 2 * V):
        monkeypatch.setattr(transform, "CHUNK_ELEMENTS", chunk)
        processor = _processor()
        processor.update_state(_update(9, added=added))
        logits = _logits(9, seed=6)
        processor.apply(logits)
        results.append(logits)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0][0], _logits(9, seed=6)[0])


def test_validate_params_rejects_bad_guard_args() -> None:
    GuardLogitsProcessor.validate_params(SamplingParams())
    GuardLogitsProcessor.validate_params(SamplingParams(extra_args={**NOISE, **WATERMARK}))
    with pytest.raises(ValueError, match="guard_noise_kind"):
        GuardLogitsProcessor.validate_params(
            SamplingParams(extra_args={**NOISE, "guard_noise_kind": "laplace"})
        )


def test_top_p_widens_its_search_and_leaves_rows_with_p_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transform, "TOP_P_START", 8)
    processor = _processor()
    flat = {"guard_top_p": 0.95}
    processor.update_state(
        _update(
            3,
            added=[
                _add(0, flat, [1], []),
                _add(1, {"guard_top_p": 1.0, "guard_top_k": 9}, [1], []),
                _add(2, flat, [1], []),
            ],
        )
    )
    logits = _logits(3, seed=8) * 0.1  # flat rows: the nucleus holds thousands of tokens
    rows = logits.numpy().copy()
    processor.apply(logits)
    for i in (0, 2):
        assert _finite(logits[i]) == _nucleus(rows[i], 0.95)
        assert len(_finite(logits[i])) > 1000
    assert _finite(logits[1]) == set(np.argsort(-rows[1])[:9].tolist())


def test_compiled_watermark_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    args = {**NOISE, **WATERMARK, "guard_top_k": 100}
    gaussian = {**NOISE, "guard_noise_kind": "gaussian", "guard_noise_seed": 3}
    added = [_add(0, args, [1], [2]), _add(1, gaussian, [1], []), _add(2, WATERMARK, [4], [5])]
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("GUARD_PLUGIN_COMPILE", flag)
        processor = _processor()
        assert (processor.add_green is transform.add_watermark) == (flag == "0")
        processor.update_state(_update(3, added=added))
        # as vLLM calls it, on logits made in inference mode: the warm-up covered this, so
        # nothing compiles again here
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            logits = _logits(3, seed=9)
            processor.apply(logits)
        results.append(logits)
    assert torch.equal(results[0], results[1])


def test_model_runner_v2_rejects_this_v1_interface_class() -> None:
    """Pins the documented limit: under Model Runner V2 vLLM 0.32.0 refuses to start with it."""
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors_params_validator,
    )

    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors_params_validator(
            ["guard_server.vllm_plugin:GuardLogitsProcessor"]
        )


def test_the_all_rows_top_k_path_equals_the_general_path() -> None:
    bounds = {"guard_top_k": 60, "guard_min_p": 0.01, "guard_top_p": 0.9}
    rows = [bounds, {**bounds, "guard_top_p": 1.0}, {**bounds, "guard_min_p": 0.0}]
    fast, general = _processor(), _processor()
    fast.update_state(_update(3, added=[_add(i, a, [1], []) for i, a in enumerate(rows)]))
    general.update_state(
        _update(
            4,
            added=[
                *(_add(i, a, [1], []) for i, a in enumerate(rows)),
                _add(3, {"guard_top_p": 0.5}, [1], []),
            ],
        )
    )
    logits = _logits(4, seed=10)
    expected = logits.clone()
    general.apply(expected)
    fast.apply(logits[:3])
    assert torch.equal(logits[:3], expected[:3])
    assert all(len(_finite(row)) <= 60 for row in logits[:3])


def test_loading_the_class_twice_for_one_engine_fails_at_startup() -> None:
    config = object()  # stands in for the engine's VllmConfig: only its identity is used
    first = GuardLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="loaded twice"):
        GuardLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]
    del first
    GuardLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]
    GuardLogitsProcessor(object(), torch.device("cpu"), False)  # type: ignore[arg-type]


def test_top_k_at_or_above_the_vocabulary_is_no_cut_and_does_not_disable_other_rows() -> None:
    processor = _processor()
    processor.update_state(
        _update(
            2, added=[_add(0, {"guard_top_k": 5}, [1], []), _add(1, {"guard_top_k": V}, [1], [])]
        )
    )
    logits = _logits(2, seed=11)
    before = logits.clone()
    processor.apply(logits)
    assert _finite(logits[0]) == set(before[0].topk(5).indices.tolist())
    assert torch.equal(logits[1], before[1])
