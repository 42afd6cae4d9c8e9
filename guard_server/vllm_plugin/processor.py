"""``GuardLogitsProcessor``: the guard's keyed noise, watermark and sampling bounds inside vLLM.

Interface. A vLLM V1 ``LogitsProcessor`` (``vllm.v1.sample.logits_processor``), the interface
of the V1 model runner. vLLM 0.32.0 uses Model Runner V2 only where Triton works; the CPU build
has none, so CPU serving runs the V1 runner and loads this class, by
``--logits-processors guard_server.vllm_plugin:GuardLogitsProcessor`` or by the
``vllm.logits_processors`` entry point. Model Runner V2 (the CUDA default in 0.32.0) refuses
V1-interface classes at startup: there, set ``VLLM_USE_V2_MODEL_RUNNER=0``.

Contract. Only the ``guard_*`` keys of ``SamplingParams.extra_args`` (the request's
``vllm_xargs``) are read, see ``guard_server.vllm_plugin.params``; ``validate_params`` rejects
bad values at admission (HTTP 400). A request without them is never touched, and when no
request in the batch has them ``apply()`` returns at once.

Batch. ``update_state`` applies removed, then added, then moved rows (a swap exchanges two
rows' requests, a one-way move overwrites the target). It keeps the output-token list vLLM
passes for each request, which vLLM appends to in place: its length is the request's step and
its last token the watermark's context (the prompt's last token at step 0).

Order. vLLM calls ``apply()`` after allowed-token, bad-word and logit-bias masking, and before
penalties, temperature, its own min-p/top-k/top-p and sampling. Here: keyed noise, then the
green-list bonus, then the forced bounds (top-k, min-p, then top-p over the survivors). What is
masked to -inf stays so through penalties and temperature, so the bounds hold for the
distribution vLLM samples from, whatever the watermark did.

Noise is ``sigma`` times a window of V values of a fixed table of standard Gumbel (or normal)
values, starting at ``noise_window(noise_row_key(seed, step))`` (``defences.hashing``): a pure
function of (seed, step, token), so a request replays exactly, with no ``torch.Generator``
state. It does not depend on the prompt: the guard must derive ``guard_noise_seed`` per request
(from the client key and the request's content), or one client would see the same noise at
every step of every prompt and could estimate and subtract it.

Logprobs. The plugin never changes returned logprobs. Under vLLM's default
``--logprobs-mode raw_logprobs`` they are computed before any logits processor: the clean
model distribution, not the perturbed one that was sampled, possibly listing tokens that the
bounds excluded. Hardening them stays the guard's job (``defences.logprobs``), which should also
cap the number of top logprobs at the tier's top-k. ``processed_logprobs`` is no fix: it would
show the watermark's green-list shifts directly, which makes the key easy to steal.

Speed. A step's work is one host-side rekey (each guarded row's step or previous token,
mixed into its per-request base key by numpy), one gather of the noise rows' windows, and one
pass over the watermarked rows' cells that hashes them in int32 (``transform``).
``GUARD_PLUGIN_COMPILE=1`` fuses that pass with ``torch.compile`` at startup: faster in
isolation on CPU, the more so the larger the vocabulary, but inside vLLM's CPU engine it gains
nothing on the bundled teacher, whose steps are too small for anything but per-call costs to
show (``benchmarks/plugin_apply.py``, docs/evaluation.md). On a GPU, where every eager op
re-reads the [rows x vocabulary] tensors, fusing should matter most; that is not measured yet.
The default is the eager transform.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from guard_server.defences.hashing import (
    NOISE_DOMAIN,
    extend_key,
    green_threshold,
    noise_window,
    premix,
    row_key,
)
from guard_server.vllm_plugin.params import GuardParams, parse
from guard_server.vllm_plugin.transform import (
    BoundRows,
    NoiseRows,
    Rows,
    VocabTables,
    WatermarkKernel,
    WatermarkRows,
    add_watermark,
    apply_guard,
    compiled_watermark,
    noise_table_length,
    signed_threshold,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)
COMPILE_ENV = "GUARD_PLUGIN_COMPILE"

# Live processors by the id of their VllmConfig: a second one for the same engine means the
# class was loaded twice (entry point and --logits-processors), which would apply it twice.
_LIVE: weakref.WeakValueDictionary[int, GuardLogitsProcessor] = weakref.WeakValueDictionary()


def _watermark_kernel(device: torch.device) -> WatermarkKernel:
    """The compiled watermark pass when ``GUARD_PLUGIN_COMPILE=1`` (compiled at startup)."""
    if os.environ.get(COMPILE_ENV, "0") != "1":
        return add_watermark
    try:
        return compiled_watermark(device)
    except Exception:  # a missing compiler must not take the engine down
        log.exception("guard plugin: torch.compile failed, using the eager watermark")
        return add_watermark


@dataclass(slots=True)
class _Request:
    """A guarded request: its settings and a live reference to its output token list."""

    params: GuardParams
    last_prompt_token: int
    output_ids: list[int]  # vLLM appends to this very list as tokens are sampled


@dataclass(slots=True)
class _Plan:
    """Per-stage rows and parameters for the current batch, built once per change.

    At every step, ``rekey`` computes on the host each noise row's window in the noise table
    and each watermark row's premixed key, into buffers that the stages' tensors view (on CPU)
    or are copied to (on other devices). Both come from ``extend_key(base, part)``, the part
    being the noise row's step or the watermark row's previous token.
    """

    shape: tuple[int, int]  # the logits' (rows, vocabulary) it was built for
    noise_outputs: list[list[int]]  # the noise rows' output token lists
    wm_requests: list[_Request]
    bases: np.ndarray  # uint32: row_key(seed, NOISE_DOMAIN) per noise row, then row_key(wm_key)
    kind_starts: np.ndarray  # int64 per noise row: where its kind's half of the table starts
    windows_host: np.ndarray  # int64, one per noise row
    keys_host: np.ndarray  # int32, one per watermark row
    windows: torch.Tensor  # windows_host on the logits' device (on CPU, the same memory)
    keys: torch.Tensor  # keys_host, likewise
    noise: NoiseRows | None
    watermark: WatermarkRows | None
    bounds: BoundRows | None

    def rekey(self) -> None:
        """This step's noise windows and watermark keys into the host buffers."""
        previous = [
            r.output_ids[-1] if r.output_ids else r.last_prompt_token for r in self.wm_requests
        ]
        parts = np.array([*map(len, self.noise_outputs), *previous], dtype=np.uint32)
        keys = extend_key(self.bases, parts)
        count = len(self.noise_outputs)
        np.add(noise_window(keys[:count]), self.kind_starts, out=self.windows_host)
        self.keys_host[:] = premix(keys[count:]).view(np.int32)


class GuardLogitsProcessor(LogitsProcessor):
    """Adds keyed noise and a KGW watermark and forces sampling bounds, per request."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``guard_*`` args at admission (vLLM answers HTTP 400)."""
        parse(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        if vllm_config is not None:
            if _LIVE.get(id(vllm_config)) is not None:
                raise RuntimeError(
                    "GuardLogitsProcessor is loaded twice, so it would apply twice: install the "
                    "vllm.logits_processors entry point or pass --logits-processors, not both"
                )
            _LIVE[id(vllm_config)] = self
        self.device = torch.device(device)
        self.pin_memory = is_pin_memory
        self.requests: dict[int, _Request] = {}  # batch row -> guarded request
        self._plan: _Plan | None = None
        self._tables: VocabTables | None = None
        self.add_green = _watermark_kernel(self.device)

    def is_argmax_invariant(self) -> bool:
        """Noise and the watermark move the argmax, so greedy requests need ``apply()`` too."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed, then added, then moved (incl. swaps)."""
        if batch_update is None:
            return
        requests = self.requests
        for index in batch_update.removed:
            requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            guard = parse(params.extra_args)
            if guard is not None and guard.active:
                last = prompt_ids[-1] if prompt_ids else 0
                requests[index] = _Request(guard, last, output_ids)
            else:
                requests.pop(index, None)
        for a, b, direction in batch_update.moved:
            a_request = requests.pop(a, None)
            b_request = requests.pop(b, None)
            if a_request is not None:
                requests[b] = a_request
            if b_request is not None and direction == MoveDirectionality.SWAP:
                requests[a] = b_request
        self._plan = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform the guarded rows in place; other rows are left bit for bit."""
        if not self.requests:
            return logits
        plan = self._plan
        if plan is None or plan.shape != tuple(logits.shape):
            plan = self._plan = self._build_plan(logits.shape[0], logits.shape[1], logits.device)
        tables = self._tables
        if tables is None or tables.hashes.shape[0] != logits.shape[1]:
            tables = self._tables = VocabTables.build(logits.shape[1], logits.device)
        plan.rekey()
        if logits.device.type != "cpu":
            for host, target in ((plan.windows_host, plan.windows), (plan.keys_host, plan.keys)):
                source = torch.from_numpy(host)
                target.copy_(source.pin_memory() if self.pin_memory else source, non_blocking=True)
        return apply_guard(logits, tables, plan.noise, plan.watermark, plan.bounds, self.add_green)

    def _build_plan(self, num_rows: int, vocab_size: int, device: torch.device) -> _Plan:
        rows = sorted(i for i in self.requests if i < num_rows)
        by_row = [(i, self.requests[i]) for i in rows]
        noisy = [(i, r) for i, r in by_row if r.params.noise]
        marked = [(i, r) for i, r in by_row if r.params.watermark]
        bounded = [(i, r) for i, r in by_row if r.params.bounds]

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        def rows_of(selected: list[tuple[int, _Request]]) -> Rows:
            index = [i for i, _ in selected]
            contiguous = index == list(range(index[0], index[0] + len(index)))
            return Rows(put(index, torch.int64), index[0] if contiguous else None)

        seeds = np.array([r.params.noise_seed for _, r in noisy], dtype=np.int64)
        wm_keys = np.array([r.params.wm_key for _, r in marked], dtype=np.int64)
        bases = np.concatenate([row_key(seeds, NOISE_DOMAIN), row_key(wm_keys)]).astype(np.uint32)
        gaussian = np.array([r.params.noise_kind == "gaussian" for _, r in noisy], dtype=bool)
        windows_host = np.zeros(len(noisy), dtype=np.int64)
        keys_host = np.zeros(len(marked), dtype=np.int32)

        def device_buffer(host: np.ndarray) -> torch.Tensor:
            if device.type == "cpu":
                return torch.from_numpy(host)
            return torch.empty(host.shape, dtype=torch.from_numpy(host).dtype, device=device)

        windows, keys = device_buffer(windows_host), device_buffer(keys_host)
        noise = None
        if noisy:
            sigma = put([r.params.noise_sigma for _, r in noisy], torch.float32)
            noise = NoiseRows(rows_of(noisy), windows, sigma)
        watermark = None
        if marked:
            thresholds = [signed_threshold(green_threshold(r.params.wm_gamma)) for _, r in marked]
            watermark = WatermarkRows(
                rows_of(marked),
                keys,
                put(thresholds, torch.int32),
                put([r.params.wm_delta for _, r in marked], torch.float32),
            )
        bounds = None
        if bounded:
            top_k = [k if k < vocab_size else 0 for k in (r.params.top_k for _, r in bounded)]
            top_p = [r.params.top_p for _, r in bounded]
            min_p = [r.params.min_p for _, r in bounded]
            bounds = BoundRows(
                rows_of(bounded),
                put(top_k, torch.int64) if any(top_k) else None,
                put(top_p, torch.float32) if min(top_p) < 1.0 else None,
                put(min_p, torch.float32) if any(min_p) else None,
                max_top_k=max(top_k),
                all_top_k=all(top_k),
                all_top_p=max(top_p) < 1.0,
            )
        return _Plan(
            shape=(num_rows, vocab_size),
            noise_outputs=[r.output_ids for _, r in noisy],
            wm_requests=[r for _, r in marked],
            bases=bases,
            kind_starts=gaussian * np.int64(noise_table_length(vocab_size)),
            windows_host=windows_host,
            keys_host=keys_host,
            windows=windows,
            keys=keys,
            noise=noise,
            watermark=watermark,
            bounds=bounds,
        )
