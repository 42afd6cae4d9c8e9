"""The guard's logits transform on selected rows, in torch: keyed noise, watermark, bounds.

Each stage works on all its rows at once (never a loop over the vocabulary) and in place.
Rows go through in chunks so that the hash temporaries stay small (``CHUNK_ELEMENTS``): vLLM
sized its memory without this plugin's work in the sampler.

The cell hash is ``defences.hashing``'s, computed on int32 tensors: a 32-bit value is held as
the int32 with the same bits, products wrap modulo 2**32 (as they do in torch's CPU and CUDA
kernels), and a logical right shift is an arithmetic one masked to the remaining bits. That
moves half the bytes of the int64 form and multiplies about four times faster on CPU. Since
the mixer's first step commutes with xor (``hashing.premix``), token hashes and row keys are
premixed apart, outside the [rows x vocabulary] work.

On a small model the plugin's cost is mostly per call, not per cell (the model's forward pass
evicts the caches between two steps, so every call starts cold): noise and watermark on the
same rows therefore hash all their cells in one pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guard_server.defences.hashing import MULTIPLIERS, SHIFTS, premix, token_hash, unit_from_bits

CHUNK_ELEMENTS = 1 << 22  # 4 Mi cells: 16 MiB per int32 temporary
FLOAT_BITS = 23  # (x + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1)
_SHIFT = 32 - FLOAT_BITS
_SIGN = -(1 << 31)  # xor with the sign bit maps unsigned order onto int32 order
TOP_P_START = 1024  # top-p first looks at this many top tokens, widening x4 as needed


def vocab_hashes(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``premix(token_hash(v))`` for every token id, int32 on ``device``."""
    hashes = premix(token_hash(np.arange(vocab_size, dtype=np.uint32)))
    return torch.from_numpy(hashes.view(np.int32)).to(device)


def signed_threshold(threshold: int) -> int:
    """A green-list bound on unsigned hashes, for hashes xor-ed with the sign bit as int32."""
    return threshold + _SIGN


@dataclass(frozen=True, slots=True)
class Rows:
    """Which logits rows a stage touches; ``start`` is set when they are one contiguous run."""

    index: torch.Tensor  # int64 [R] on the logits' device
    start: int | None  # rows are start, start + 1, ... (known on the host: no device sync)

    @property
    def count(self) -> int:
        """The number of rows."""
        return int(self.index.shape[0])


@dataclass(frozen=True, slots=True)
class NoiseRows:
    """Keyed noise: per-row keys (keyed by the step), scales, and kinds."""

    rows: Rows
    keys: torch.Tensor  # int32 [R]: premix(noise_row_key(seed, step))
    sigma: torch.Tensor  # float32 [R]
    gaussian: torch.Tensor | None  # bool [R]; None when every row uses Gumbel noise


@dataclass(frozen=True, slots=True)
class WatermarkRows:
    """Green-list watermark: per-row keys (keyed by the previous token), bounds and bonuses."""

    rows: Rows
    keys: torch.Tensor  # int32 [R]: premix(row_key(wm_key, prev_token))
    threshold: torch.Tensor  # int32 [R]: signed_threshold(green_threshold(gamma))
    delta: torch.Tensor  # float32 [R]


@dataclass(frozen=True, slots=True)
class NoiseAndWatermarkRows:
    """Noise and the watermark on the same rows, run as one stage (one fused call compiled)."""

    rows: Rows
    noise: NoiseRows
    watermark: WatermarkRows


@dataclass(frozen=True, slots=True)
class BoundRows:
    """Forced sampling bounds; a bound is None when no row uses it, else neutral where off."""

    rows: Rows
    top_k: torch.Tensor | None  # int64 [R] in [0, V), 0 = off
    top_p: torch.Tensor | None  # float32 [R], 1 = off
    min_p: torch.Tensor | None  # float32 [R], 0 = off
    max_top_k: int = 0  # the largest top_k, on the host
    all_top_k: bool = False  # every row has a top_k, on the host
    all_top_p: bool = False  # every row has a top_p < 1, on the host


def _xorshift_(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x ^= x >> shift`` on 32-bit values held as int32 (a logical shift), in place."""
    return x.bitwise_xor_(x.bitwise_right_shift(shift).bitwise_and_((1 << (32 - shift)) - 1))


def cell_hashes(keys: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """``hashing.cell_hash`` of every (row, token) cell as int32 [R, V], from premixed halves."""
    x = torch.bitwise_xor(keys[:, None], vocab[None, :])
    for multiplier, shift in zip(MULTIPLIERS, SHIFTS[1:], strict=True):
        _xorshift_(x.mul_(multiplier), shift)
    return x


def negated_noise_(hashes: torch.Tensor, gaussian: torch.Tensor | None) -> torch.Tensor:
    """Minus standard Gumbel noise (normal where ``gaussian``) from cell hashes, float32."""
    bits = hashes.bitwise_right_shift_(_SHIFT).bitwise_and_((1 << FLOAT_BITS) - 1)
    u = unit_from_bits(bits.to(torch.float32), FLOAT_BITS)
    if gaussian is None:
        return u.log_().neg_().log_()
    normal = torch.special.ndtri(u).neg_()
    return torch.where(gaussian[:, None], normal, u.log_().neg_().log_())


def _add_noise(block: torch.Tensor, hashes: torch.Tensor, noise: NoiseRows) -> None:
    block.addcmul_(negated_noise_(hashes, noise.gaussian), noise.sigma[:, None], value=-1)


def _add_green(block: torch.Tensor, hashes: torch.Tensor, wm: WatermarkRows) -> None:
    block.addcmul_(hashes.bitwise_xor_(_SIGN) < wm.threshold[:, None], wm.delta[:, None])


def add_noise(block: torch.Tensor, noise: NoiseRows, vocab: torch.Tensor) -> None:
    """``block += sigma * noise`` in place."""
    _add_noise(block, cell_hashes(noise.keys, vocab), noise)


def add_watermark(block: torch.Tensor, wm: WatermarkRows, vocab: torch.Tensor) -> None:
    """``block += delta`` on each row's green tokens, in place."""
    _add_green(block, cell_hashes(wm.keys, vocab), wm)


def add_noise_and_watermark(
    block: torch.Tensor, stage: NoiseAndWatermarkRows, vocab: torch.Tensor
) -> None:
    """``add_noise`` then ``add_watermark`` on the same rows, hashing all cells at once."""
    count = stage.noise.keys.shape[0]
    hashes = cell_hashes(torch.cat([stage.noise.keys, stage.watermark.keys]), vocab)
    _add_noise(block, hashes[:count], stage.noise)
    _add_green(block, hashes[count:], stage.watermark)


def apply_bounds(block: torch.Tensor, bounds: BoundRows) -> None:
    """Top-k, then min-p, then top-p over the survivors; exactly k survive top-k (ties cut)."""
    vocab_size = block.shape[1]
    k_limit = min(bounds.max_top_k, vocab_size)
    use_top_k = bounds.top_k is not None and 0 < k_limit < vocab_size
    if use_top_k and bounds.all_top_k:
        _bounds_within_top_k(block, bounds, k_limit)
        return
    if use_top_k:
        top_k = bounds.top_k
        values, order = block.topk(k_limit, dim=1)
        keep = torch.arange(k_limit, device=block.device)[None, :] < top_k[:, None]
        _keep_only(block, values, order, keep, top_k > 0)
    if bounds.min_p is not None:
        floor = block.amax(dim=1, keepdim=True) + bounds.min_p[:, None].log()
        block.masked_fill_(block < floor, -math.inf)
    if bounds.top_p is not None:
        _top_p(block, bounds.top_p, bounds.all_top_p)


def _bounds_within_top_k(block: torch.Tensor, bounds: BoundRows, k_limit: int) -> None:
    """The same bounds when every row has a top-k: all work on one ``topk``, one write back."""
    values, order = block.topk(k_limit, dim=1)
    ranks = torch.arange(k_limit, device=block.device)[None, :]
    values.masked_fill_(ranks >= bounds.top_k[:, None], -math.inf)
    if bounds.min_p is not None:
        values.masked_fill_(values < values[:, :1] + bounds.min_p[:, None].log(), -math.inf)
    if bounds.top_p is not None:
        p = bounds.top_p[:, None]
        keep = _nucleus(values, values.logsumexp(dim=1, keepdim=True), p) | (p >= 1.0)
        values.masked_fill_(~keep, -math.inf)
    block.fill_(-math.inf).scatter_(1, order, values)


def _top_p(block: torch.Tensor, top_p: torch.Tensor, all_rows: bool) -> None:
    """Keep each row's smallest set of top tokens whose mass reaches p (p >= 1: row kept).

    Looks at the top ``TOP_P_START`` tokens first and widens only while some row's nucleus
    is longer, instead of sorting the whole vocabulary.
    """
    vocab_size = block.shape[1]
    p = top_p[:, None]
    active = top_p < 1.0
    log_total = block.logsumexp(dim=1, keepdim=True)
    k = min(vocab_size, TOP_P_START)
    while True:
        values, order = block.topk(k, dim=1)
        keep = _nucleus(values, log_total, p)
        if k >= vocab_size or not bool((keep[:, -1] & active).any()):
            break
        k = min(vocab_size, 4 * k)
    _keep_only(block, values, order, keep, None if all_rows else active)


def _nucleus(values: torch.Tensor, log_total: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Which of the sorted ``values`` have less than ``p`` of the mass strictly ahead of them."""
    probs = (values - log_total).exp_()
    keep = probs.cumsum(dim=1).sub_(probs) < p
    keep[:, 0] = True
    return keep


def _keep_only(
    block: torch.Tensor,
    values: torch.Tensor,
    order: torch.Tensor,
    keep: torch.Tensor,
    rows: torch.Tensor | None,
) -> None:
    """Set to -inf every token but those of ``order`` marked in ``keep``, in ``rows`` (or all).

    ``values`` are the block's values at ``order``.
    """
    if rows is None:  # every row: rewrite the block from its kept values
        kept = values.masked_fill(~keep, -math.inf)
        block.fill_(-math.inf).scatter_(1, order, kept)
        return
    mask = torch.ones_like(block, dtype=torch.bool)
    mask.scatter_(1, order, ~keep)
    mask &= rows[:, None]
    block.masked_fill_(mask, -math.inf)


def _slice(stage: Any, lo: int, hi: int) -> Any:
    """The same stage restricted to its rows lo..hi (per-row tensors sliced, scalars kept)."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(stage):
        value = getattr(stage, field.name)
        if isinstance(value, Rows):
            start = None if value.start is None else value.start + lo
            changes[field.name] = Rows(value.index[lo:hi], start)
        elif isinstance(value, torch.Tensor):
            changes[field.name] = value[lo:hi]
        elif dataclasses.is_dataclass(value):  # a stage within a combined stage
            changes[field.name] = _slice(value, lo, hi)
    return dataclasses.replace(stage, **changes)


def run_stage(logits: torch.Tensor, stage: Any, step: Callable[[torch.Tensor, Any], None]) -> None:
    """Run ``step(block, part)`` over the stage's rows in chunks, writing the rows back."""
    rows: Rows = stage.rows
    chunk = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for lo in range(0, rows.count, chunk):
        hi = min(rows.count, lo + chunk)
        part = stage if (lo, hi) == (0, rows.count) else _slice(stage, lo, hi)
        if rows.start is not None:
            step(logits[rows.start + lo : rows.start + hi], part)  # a view: in place
        else:
            index = part.rows.index
            block = logits.index_select(0, index)
            step(block, part)
            logits.index_copy_(0, index, block)


@dataclass(frozen=True, slots=True)
class Kernels:
    """The hash-heavy stages: eager torch, or fused by ``compiled_kernels``."""

    noise: Callable[[torch.Tensor, NoiseRows, torch.Tensor], None] = add_noise
    watermark: Callable[[torch.Tensor, WatermarkRows, torch.Tensor], None] = add_watermark
    noise_and_watermark: Callable[[torch.Tensor, NoiseAndWatermarkRows, torch.Tensor], None] = (
        add_noise_and_watermark
    )


EAGER = Kernels()


def compiled_kernels(device: torch.device | str) -> Kernels:
    """The stages compiled by ``torch.compile`` (one fused pass each), warmed up for all shapes.

    Compiled noise may differ from eager noise in the last float bits (another ``log``), so
    all replicas of a deployment should make the same choice.
    """
    kernels = Kernels(
        noise=torch.compile(add_noise, dynamic=True),
        watermark=torch.compile(add_watermark, dynamic=True),
        noise_and_watermark=torch.compile(add_noise_and_watermark, dynamic=True),
    )
    with torch.inference_mode():  # as vLLM calls logits processors: no recompiling there
        _warm_up(kernels, device)
    return kernels


def _warm_up(kernels: Kernels, device: torch.device | str) -> None:
    """One call of each compiled stage per shape class and noise kind."""
    vocab = vocab_hashes(64, device)
    for count in (1, 2):  # dynamic shapes still specialize a dimension of size 1
        rows = Rows(torch.arange(count, device=device), 0)
        keys = torch.arange(count, dtype=torch.int32, device=device)
        ones = torch.ones(count, device=device)
        block = torch.zeros(count, 64, device=device)
        watermark = WatermarkRows(rows, keys, keys + _SIGN, ones)
        kernels.watermark(block, watermark, vocab)
        for gaussian in (None, torch.ones(count, dtype=torch.bool, device=device)):
            noise = NoiseRows(rows, keys.clone(), ones.clone(), gaussian)
            kernels.noise(block, noise, vocab)
            kernels.noise_and_watermark(block, NoiseAndWatermarkRows(rows, noise, watermark), vocab)


def apply_guard(
    logits: torch.Tensor,
    vocab: torch.Tensor,
    noise: NoiseRows | None = None,
    watermark: WatermarkRows | None = None,
    bounds: BoundRows | None = None,
    kernels: Kernels = EAGER,
) -> torch.Tensor:
    """Noise, then watermark, then bounds, each on its own rows; in place, returns ``logits``.

    Noise and watermark that share their ``Rows`` object run as one stage.
    """
    if noise is not None and watermark is not None and noise.rows is watermark.rows:
        both = NoiseAndWatermarkRows(noise.rows, noise, watermark)
        run_stage(logits, both, lambda block, part: kernels.noise_and_watermark(block, part, vocab))
        noise = watermark = None
    if noise is not None:
        run_stage(logits, noise, lambda block, part: kernels.noise(block, part, vocab))
    if watermark is not None:
        run_stage(logits, watermark, lambda block, part: kernels.watermark(block, part, vocab))
    if bounds is not None:
        run_stage(logits, bounds, apply_bounds)
    return logits
