"""The guard's logits transform on selected rows, in torch: keyed noise, watermark, bounds.

Each stage works on all its rows at once (never a loop over the vocabulary) and in place.
Rows go through in chunks so that the temporaries stay small (``CHUNK_ELEMENTS``): vLLM sized
its memory without this plugin's work in the sampler.

Noise is read, not computed: each vocabulary size gets one table of standard Gumbel values and
one of standard normal values (``noise_table``), and a noise row adds sigma times a window of
V consecutive values, starting where its keyed row key says (``hashing.noise_window``). Within
a row the values are distinct entries of a hashed sequence; which window a row reads is the
secret part. One gather per step replaces a hash of every cell.

The watermark's cell hash is ``defences.hashing``'s, computed on int32 tensors: a 32-bit value
is held as the int32 with the same bits, products wrap modulo 2**32 (as they do in torch's CPU
and CUDA kernels), and a logical right shift is an arithmetic one masked to the remaining bits.
Since the mixer's first step commutes with xor (``hashing.premix``), token hashes and row keys
are premixed apart, outside the [rows x vocabulary] work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guard_server.defences.hashing import (
    MULTIPLIERS,
    NOISE_WINDOW_BITS,
    SHIFTS,
    noise_table_hash,
    premix,
    token_hash,
    unit_from_bits,
)

CHUNK_ELEMENTS = 1 << 22  # 4 Mi cells: 16 MiB per temporary
FLOAT_BITS = 23  # (x + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1)
_SHIFT = 32 - FLOAT_BITS
_SIGN = -(1 << 31)  # xor with the sign bit maps unsigned order onto int32 order
TOP_P_START = 1024  # top-p first looks at this many top tokens, widening x4 as needed


def vocab_hashes(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``premix(token_hash(v))`` for every token id, int32 on ``device``."""
    hashes = premix(token_hash(np.arange(vocab_size, dtype=np.uint32)))
    return torch.from_numpy(hashes.view(np.int32)).to(device)


def noise_table_length(vocab_size: int) -> int:
    """Values per noise kind: every window start, plus one window."""
    return (1 << NOISE_WINDOW_BITS) + vocab_size


def noise_table(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Every noise window as a row of a [2 L - V + 1, V] view (L = ``noise_table_length``).

    The flat table holds L standard Gumbel values, then L standard normal values from the same
    uniforms: Gumbel windows start below ``2 ** NOISE_WINDOW_BITS``, normal ones at L + that.
    """
    hashes = noise_table_hash(np.arange(noise_table_length(vocab_size), dtype=np.uint32))
    bits = torch.from_numpy((hashes >> _SHIFT).astype(np.float32))  # exact: below 2**23
    u = unit_from_bits(bits, FLOAT_BITS)
    values = torch.cat([u.log().neg_().log_().neg_(), torch.special.ndtri(u)])
    return values.to(device).unfold(0, vocab_size, 1)


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
    """Keyed noise: each row's window in the noise table (keyed by the step), and its scale."""

    rows: Rows
    windows: torch.Tensor  # int64 [R]: a row of noise_table(), which also sets the kind
    sigma: torch.Tensor  # float32 [R]


@dataclass(frozen=True, slots=True)
class WatermarkRows:
    """Green-list watermark: per-row keys (keyed by the previous token), bounds and bonuses."""

    rows: Rows
    keys: torch.Tensor  # int32 [R]: premix(row_key(wm_key, prev_token))
    threshold: torch.Tensor  # int32 [R]: signed_threshold(green_threshold(gamma))
    delta: torch.Tensor  # float32 [R]


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


def add_noise(block: torch.Tensor, noise: NoiseRows, table: torch.Tensor) -> None:
    """``block += sigma * noise``, each row's noise a window of ``table``, in place."""
    block.addcmul_(table.index_select(0, noise.windows), noise.sigma[:, None])


def add_watermark(block: torch.Tensor, wm: WatermarkRows, vocab: torch.Tensor) -> None:
    """``block += delta`` on each row's green tokens, in place."""
    hashes = cell_hashes(wm.keys, vocab).bitwise_xor_(_SIGN)
    block.addcmul_(hashes < wm.threshold[:, None], wm.delta[:, None])


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


WatermarkKernel = Callable[[torch.Tensor, WatermarkRows, torch.Tensor], None]


def compiled_watermark(device: torch.device | str) -> WatermarkKernel:
    """``add_watermark`` fused into one pass by ``torch.compile``, warmed up for all shapes.

    Integer hashing and one add: its results are bit for bit the eager ones.
    """
    kernel = torch.compile(add_watermark, dynamic=True)
    with torch.inference_mode():  # as vLLM calls logits processors: no recompiling there
        vocab = vocab_hashes(64, device)
        for count in (1, 2):  # dynamic shapes still specialize a dimension of size 1
            rows = Rows(torch.arange(count, device=device), 0)
            keys = torch.arange(count, dtype=torch.int32, device=device)
            ones = torch.ones(count, device=device)
            stage = WatermarkRows(rows, keys, keys.clone(), ones)  # distinct: no aliasing guard
            kernel(torch.zeros(count, 64, device=device), stage, vocab)
    return kernel


@dataclass(frozen=True, slots=True)
class VocabTables:
    """What the stages read for one vocabulary size: token hashes and the noise windows."""

    hashes: torch.Tensor  # vocab_hashes()
    noise: torch.Tensor  # noise_table()

    @classmethod
    def build(cls, vocab_size: int, device: torch.device | str) -> VocabTables:
        """Both tables for ``vocab_size`` on ``device``."""
        return cls(vocab_hashes(vocab_size, device), noise_table(vocab_size, device))


def apply_guard(
    logits: torch.Tensor,
    tables: VocabTables,
    noise: NoiseRows | None = None,
    watermark: WatermarkRows | None = None,
    bounds: BoundRows | None = None,
    add_green: WatermarkKernel = add_watermark,
) -> torch.Tensor:
    """Noise, then watermark, then bounds, each on its own rows; in place, returns ``logits``."""
    if noise is not None:
        run_stage(logits, noise, lambda block, part: add_noise(block, part, tables.noise))
    if watermark is not None:
        run_stage(logits, watermark, lambda block, part: add_green(block, part, tables.hashes))
    if bounds is not None:
        run_stage(logits, bounds, apply_bounds)
    return logits
