"""The guard's serve path with config-load timing, in-process client population, memory."""

# The guard as ``guard-server serve`` runs it (one worker), timing its config load and, with
# ``--populate N``, first folding one request of each of N clients straight into its state
# store (in process, no HTTP), as the score and admit stages would. Prints ``SCALE_JSON {...}``
# once it serves and the population is done, and ``RSS_JSON {...}`` on each SIGUSR1.
#
#     python -m benchmarks.scale_guard --config guard.yaml --port 9100 --populate 1000000

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import signal
import sys
import time
import types
import uuid
from pathlib import Path

import psutil

import guard_server.app as guard_app
from guard_server.canonical import canonical_input
from guard_server.config.loader import load_settings
from guard_server.detection.features import extract_features
from guard_server.openai_fields import Endpoint
from guard_server.state.base import StateStore

KEY_PREFIX = "sk-bench-"
_BATCH = 5000


def client_body(i: int) -> dict:
    """The request body client ``i`` sends (a distinct prompt per client)."""
    return {
        "model": "teacher",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Question {i}: what is 12 + 7?"},
        ],
        "max_tokens": 16,
        "temperature": 0,
    }


def _rss() -> int:
    """Resident memory after a full collection, with freed heap handed back to the system
    (so what the loader freed does not count as kept)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def deep_size(root: object) -> int:
    """Bytes held by ``root`` and everything it references, each object counted once
    (modules, classes and functions, shared by everything, are not followed)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def _peak_rss() -> int:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def _populate(store: StateStore, settings, count: int, slot_ttl_s: float) -> float:  # type: ignore[no-untyped-def]
    """Observe and admit (then settle) one request of each of ``count`` clients."""
    started = time.perf_counter()
    for i in range(count):
        digest = hashlib.sha256(f"{KEY_PREFIX}{i:07d}".encode()).digest()
        client = settings.clients_by_key_hash[digest]
        tier = client.tier
        body = client_body(i)
        if tier.detection.enabled:
            canonical = canonical_input(Endpoint.CHAT, body)
            features = extract_features(canonical, max(1, tier.logprobs.max_top))
            await store.observe(client.id, features)
        if not client.limits.unlimited:
            scope = f"c:{client.id}"
            admission = await store.admit(scope, client.limits, 30, uuid.uuid4().hex, slot_ttl_s)
            await store.settle(scope, client.limits, admission.slot, 2)
        if i % _BATCH == 0:
            await asyncio.sleep(0)  # keep /healthz answering
    return time.perf_counter() - started


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--populate", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    from guard_server.runner import serve

    rss_start = _rss()
    started = time.perf_counter()
    settings = load_settings(args.config)
    load_s = time.perf_counter() - started
    rss_loaded = _rss()
    clients_bytes = deep_size(settings.clients_by_key_hash)
    stores: list[StateStore] = []
    make_store = guard_app._state_store

    def capture(state, password):  # type: ignore[no-untyped-def]
        store = make_store(state, password)
        stores.append(store)
        return store

    guard_app._state_store = capture  # the real store, remembered for the population
    tasks: list[asyncio.Task[None]] = []

    def on_ready(base_url: str) -> None:
        async def report() -> None:
            populate_s = 0.0
            if args.populate:
                populate_s = await _populate(
                    stores[0], settings, args.populate, guard_app._slot_ttl(settings)
                )
            result = {
                "clients_configured": len(settings.clients_by_key_hash),
                "config_load_s": load_s,
                "startup_s": time.perf_counter() - started,
                "populated_in_process": args.populate,
                "populate_s": populate_s,
                "rss_start": rss_start,
                "rss_after_load": rss_loaded,
                "clients_deep_bytes": clients_bytes,
                "rss_after_populate": _rss(),
                "rss_peak": _peak_rss(),
            }
            print("SCALE_JSON " + json.dumps(result), flush=True)

        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(report()))
        loop.add_signal_handler(signal.SIGUSR1, memory_report)

    def memory_report() -> None:
        report = {"rss": _rss(), "rss_peak": _peak_rss(), "store_deep_bytes": deep_size(stores[0])}
        print("RSS_JSON " + json.dumps(report), flush=True)

    serve(settings, "127.0.0.1", args.port, on_ready)


if __name__ == "__main__":
    main()
