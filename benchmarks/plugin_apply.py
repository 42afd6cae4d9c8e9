"""Cost of the vLLM plugin's ``apply()`` per decoding step, with its watermark eager or compiled.

    .venv/bin/python -m benchmarks.plugin_apply                  # CPU, 256 x 152,064
    .venv/bin/python -m benchmarks.plugin_apply --device cuda    # on a GPU machine

Every row is a guarded request. Each call gets a fresh copy of the same logits (the copy is
not timed); the figure is the median over ``--repeats`` calls after ``--warmup`` calls. The
"copy" row is one read and one write of the tensor: the floor for any transform of it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from guard_server.vllm_plugin import GuardLogitsProcessor
from guard_server.vllm_plugin.transform import WatermarkKernel, add_watermark, compiled_watermark

SCENARIOS: dict[str, dict[str, object]] = {
    "noise only": {"guard_noise_seed": 1, "guard_noise_sigma": 1.0},
    "watermark only": {"guard_wm_key": 7},
    "noise + watermark": {"guard_noise_seed": 1, "guard_noise_sigma": 1.0, "guard_wm_key": 7},
    "noise + watermark + bounds": {
        "guard_noise_seed": 1,
        "guard_noise_sigma": 1.0,
        "guard_wm_key": 7,
        "guard_top_k": 50,
        "guard_top_p": 0.95,
    },
}


def _processor(
    extra_args: dict[str, object], batch: int, device: torch.device, add_green: WatermarkKernel
) -> GuardLogitsProcessor:
    processor = GuardLogitsProcessor(None, device, False)  # type: ignore[arg-type]
    processor.add_green = add_green
    added = [
        (i, SamplingParams(extra_args={**extra_args, "guard_noise_seed": i}), [1, 2], [3] * 10)
        for i in range(batch)
    ]
    processor.update_state(BatchUpdate(batch_size=batch, removed=[], added=added, moved=[]))
    return processor


def _time_ms(
    call: Callable[[torch.Tensor], object], base: torch.Tensor, warmup: int, repeats: int
) -> float:
    work = torch.empty_like(base)
    cuda = base.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        work.copy_(base)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            call(work)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            call(work)
            elapsed = (time.perf_counter() - began) * 1000
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (vLLM's CPU engine calls apply() on 1; default: torch's)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    base = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    base = (base * 3).to(device)
    variants: dict[str, WatermarkKernel] = {"eager": add_watermark}
    if not args.no_compile:
        began = time.perf_counter()
        variants["compiled"] = compiled_watermark(device)
        print(f"torch.compile warm-up: {time.perf_counter() - began:.1f} s")

    floor = _time_ms(lambda x: x.copy_(base), base, args.warmup, args.repeats)
    idle = _processor({}, args.batch, device, add_watermark)
    untouched = _time_ms(idle.apply, base, args.warmup, args.repeats)
    names = list(variants)
    print(
        f"\n`apply()` on [{args.batch} x {args.vocab:,}] float32, {device.type}"
        f" ({torch.get_num_threads()} threads), torch {torch.__version__}; median ms per call\n"
    )
    print("| scenario | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    print(f"| copy (floor) | {floor:.2f} |" + " |" * (len(names) - 1))
    print(f"| no guarded rows | {untouched:.4f} |" + " |" * (len(names) - 1))
    for scenario, extra_args in SCENARIOS.items():
        cells = []
        for add_green in variants.values():
            processor = _processor(extra_args, args.batch, device, add_green)
            cells.append(_time_ms(processor.apply, base, args.warmup, args.repeats))
        print(f"| {scenario} | " + " | ".join(f"{ms:.2f}" for ms in cells) + " |")


if __name__ == "__main__":
    main()
