"""What the attack simulators share: vLLM and a guard on loopback (the harness), the tiers' limits,
keys, batched requests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from guard_server.config.loader import logprob_hardening
from guard_server.config.schema import TierPolicy
from guard_server.defences.logprobs import LogprobHardening
from guard_server.pipeline.auth import hash_key
from guard_server.teacher import MODEL_DIR, SERVED_MODEL_NAME
from guard_server.testing import (
    DEFAULT_POLICY,
    DEMO_KEY,
    TRUSTED_KEY,
    free_port,
    running_vllm,
    vllm_process,
    write_config,
)
from load_tests.checkout import Checkout, guard_process

POLICY_FILE = DEFAULT_POLICY
PORTS = range(8700, 8800)
"""The ports set aside for the attack harness's vLLM and guard."""
MODEL = SERVED_MODEL_NAME

DEFAULT_KEY = DEMO_KEY
"""The demo key of the default tier (policies/demo-clients.yaml)."""
EXTRA_DEFAULT_KEYS = ("sk-attack-default-2", "sk-attack-default-3")
"""Two more default-tier keys that only the harness's own guard knows (multi-key averaging)."""

SECRET = b"attack-simulations-fixed-secret-0123456789abcdef"
"""A fixed guard secret, so the keyed noise (and every figure) is reproducible."""


def default_hardening(policy_file: Path = POLICY_FILE, tier: str = "default") -> LogprobHardening:
    """The logprob hardening that ``tier`` of ``policy_file`` applies (as the guard builds it)."""
    data = yaml.safe_load(policy_file.read_text())
    return logprob_hardening(TierPolicy.model_validate(data["tiers"][tier]).logprobs)


def tier_max_top(policy_file: Path = POLICY_FILE, tier: str = "default") -> int:
    """The tier's cap on ``logprobs`` / ``top_logprobs``."""
    data = yaml.safe_load(policy_file.read_text())
    return TierPolicy.model_validate(data["tiers"][tier]).logprobs.max_top


def tier_bias_limit(policy_file: Path = POLICY_FILE, tier: str = "default") -> tuple[int, float]:
    """The tier's ``logit_bias`` limit: (most entries, largest magnitude)."""
    data = yaml.safe_load(policy_file.read_text())
    bias = TierPolicy.model_validate(data["tiers"][tier]).logit_bias
    return bias.max_entries, bias.max_abs


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Target:
    """Where an attacker sends its requests: the guard's base URL (no ``/v1``) and its key."""

    base_url: str
    key: str
    label: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass(slots=True)
class Response:
    """One answer: HTTP status and the JSON body (an OpenAI error object when not 200)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def error(self) -> str:
        """``status code: message`` of an error answer."""
        err = self.body.get("error") or {}
        return f"{self.status} {err.get('code') or err.get('type')}: {err.get('message')}"


@dataclass(slots=True)
class Counter:
    """Requests sent so far (the query budget spent)."""

    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def add(self, status: int) -> None:
        self.sent += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1


async def _post_all(
    target: Target,
    path: str,
    bodies: Sequence[dict[str, Any] | bytes],
    concurrency: int,
    counter: Counter | None,
) -> list[Response]:
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    url = target.base_url.rstrip("/") + path
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=target.headers
    ) as session:

        async def one(body: dict[str, Any] | bytes) -> Response:
            kwargs: dict[str, Any] = (
                {"data": body, "headers": {"Content-Type": "application/json"}}
                if isinstance(body, bytes)
                else {"json": body}
            )
            async with sem, session.post(url, **kwargs) as resp:
                data = await resp.json(content_type=None)
                if counter is not None:
                    counter.add(resp.status)
                return Response(resp.status, data if isinstance(data, dict) else {})

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def completions(
    target: Target,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int = 32,
    counter: Counter | None = None,
) -> list[Response]:
    """POST every body to ``/v1/completions`` (``model`` filled in), in order."""
    full = [{"model": MODEL, **b} for b in bodies]
    return asyncio.run(_post_all(target, "/v1/completions", full, concurrency, counter))


def chat_completions(
    target: Target,
    bodies: Sequence[dict[str, Any] | bytes],
    *,
    concurrency: int = 32,
    counter: Counter | None = None,
) -> list[Response]:
    """POST every body to ``/v1/chat/completions`` as it is (bytes are sent verbatim), in order."""
    path = "/v1/chat/completions"
    return asyncio.run(_post_all(target, path, bodies, concurrency, counter))


def chat_logprobs(response: Response) -> list[tuple[str, float, dict[str, float]]]:
    """Per generated position of choice 0 of a chat answer: (token, its logprob, the top
    logprobs), as :func:`completion_logprobs` gives them for a completion."""
    content = (response.body["choices"][0].get("logprobs") or {}).get("content") or []
    return [
        (
            item["token"],
            float(item["logprob"]),
            {top["token"]: float(top["logprob"]) for top in item.get("top_logprobs") or []},
        )
        for item in content
    ]


def completion_logprobs(response: Response) -> list[tuple[str, float, dict[str, float]]]:
    """Per generated position of choice 0: (token, its logprob, the top logprobs)."""
    logprobs = response.body["choices"][0].get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    return [
        (t, float(v), {k: float(x) for k, x in (tops[i] or {}).items()} if i < len(tops) else {})
        for i, (t, v) in enumerate(zip(tokens, values, strict=True))
    ]


# --------------------------------------------------------------------------- processes


def write_guard_config(
    directory: Path,
    vllm_url: str,
    *,
    detection: bool = False,
    served_model: str = MODEL,
    policy_file: Path = POLICY_FILE,
) -> Path:
    """A guard config with the repo's tiers, the demo clients and two more default-tier keys.

    With ``detection=False`` both tiers have extraction scoring switched off, so what is
    measured is the logprob policy alone (an attacker that stays below the detector).
    The tiers come from ``policy_file``.
    """
    tiers = yaml.safe_load(policy_file.read_text())["tiers"]
    if not detection:
        for policy in tiers.values():
            policy["detection"] = {**(policy.get("detection") or {}), "enabled": False}
    clients = {
        "attack-trusted": {"tier": "trusted", "keys": [hash_key(TRUSTED_KEY)]},
        "attack-default": {"tier": "default", "keys": [hash_key(DEFAULT_KEY)]},
    }
    for i, key in enumerate(EXTRA_DEFAULT_KEYS, start=2):
        clients[f"attack-default-{i}"] = {"tier": "default", "keys": [hash_key(key)]}
    (directory / "tiers.yaml").write_text(yaml.safe_dump({"tiers": tiers}))
    (directory / "clients.yaml").write_text(yaml.safe_dump({"clients": clients}))
    (directory / "secret").write_bytes(SECRET)
    return write_config(
        directory,
        [vllm_url],
        model=MODEL,
        policies=["tiers.yaml", "clients.yaml"],
        upstream={
            "served_model": served_model,
            "timeouts": {"connect": 5, "read": 120, "total": 600},
        },
        secret={"file": str(directory / "secret")},
    )


@dataclass(frozen=True, slots=True)
class Stack:
    """A running guard (and the vLLM behind it) with one target per tier."""

    guard_url: str
    vllm_url: str
    model_dir: Path

    @property
    def trusted(self) -> Target:
        return Target(self.guard_url, TRUSTED_KEY, "trusted")

    @property
    def default(self) -> Target:
        return Target(self.guard_url, DEFAULT_KEY, "default")

    def default_keys(self) -> list[Target]:
        """Every default-tier key this guard knows (for multi-key attacks)."""
        keys = (DEFAULT_KEY, *EXTRA_DEFAULT_KEYS)
        return [Target(self.guard_url, k, f"default#{i + 1}") for i, k in enumerate(keys)]


@contextlib.contextmanager
def running_stack(
    model_dir: Path = MODEL_DIR,
    *,
    vllm_url: str | None = None,
    detection: bool = False,
    workdir: Path | None = None,
    served_model: str = MODEL,
    checkout: Checkout | None = None,
) -> Iterator[Stack]:
    """Start vLLM (unless ``vllm_url`` is given) and a guard in front of it; stop both after.

    ``served_model``: the name a reused vLLM serves the model under (clients still say
    ``teacher``). ``checkout``: run that checkout's guard and tiers instead of this one's."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attacks-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if vllm_url is None:
            vllm = vllm_process(model_dir, workdir / "vllm.log", ports=PORTS)
            print(f"starting vLLM on {model_dir} at {vllm.url} ...", file=sys.stderr, flush=True)
            stack.enter_context(running_vllm(vllm))
            vllm_url = vllm.url
        policy = checkout.policy if checkout else POLICY_FILE
        config = write_guard_config(
            workdir, vllm_url, detection=detection, served_model=served_model, policy_file=policy
        )
        guard = guard_process(checkout, config, workdir / "guard.log", port=free_port(PORTS))
        stack.enter_context(guard)
        yield Stack(guard.url, vllm_url.rstrip("/"), model_dir)


def add_stack_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line options every attack shares (which model, reuse a vLLM, detection)."""
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="teacher to serve")
    ap.add_argument("--vllm-url", default=None, help="reuse a running vLLM (no /v1)")
    ap.add_argument(
        "--detection",
        action="store_true",
        help="keep extraction scoring on (default: off, to measure the logprob policy alone)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and configs here")
    ap.add_argument(
        "--served-model",
        default=MODEL,
        help="the model name the reused vLLM serves (e.g. smollm2 for the real-model lab's)",
    )
    ap.add_argument(
        "--guard-checkout",
        type=Path,
        default=None,
        help="run the guard of this checkout (e.g. a git worktree of an earlier commit)",
    )


def stack_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager[Stack]:
    """The stack the parsed options ask for."""
    if args.vllm_url is None and not (args.model_dir / "config.json").exists():
        raise SystemExit(f"no model at {args.model_dir}: pass --model-dir or --vllm-url")
    return running_stack(
        args.model_dir,
        vllm_url=args.vllm_url,
        detection=args.detection,
        workdir=args.workdir,
        served_model=args.served_model,
        checkout=Checkout(args.guard_checkout) if args.guard_checkout else None,
    )


def threads(n: int = 1) -> None:
    """Keep numeric libraries to ``n`` threads.

    On a shared, loaded 2-core machine one thread trains the lab's student 3-6x faster than
    two: spinning OpenMP threads that wait for each other are what costs.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(n)
