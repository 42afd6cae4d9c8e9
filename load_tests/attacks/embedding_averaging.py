"""Embeddings: what the tier's keyed vector noise costs retrieval, and what averaging gains.

    .venv/bin/python -m load_tests.attacks.embedding_averaging [--embed-url URL] [--texts 300]

Real vLLM serves the bundled teacher as an embedding model (``--convert embed``; or reuse one
with ``--embed-url``), behind a real guard with the shipped tiers (detection off: the vector
policy alone is measured) and one extra tier per noise level of the sweep (the default tier's
policy with only ``embeddings.noise`` changed). The true vectors are the trusted tier's:
exactly what vLLM returns.

Retrieval: ``--texts`` task questions are embedded through each tier; for each text, its 10
nearest others by cosine in the tier's vectors are compared with its 10 nearest in the true
vectors (recall@10; top-1: the nearest one is the same).

Averaging: for ``--targets`` of those texts, an attacker sends k = 1, 4, 16, 64 inputs and
averages the returned vectors (then normalizes), hoping the noise cancels. Three ways to get
k answers about one text: the same input repeated (the noise is keyed to the input's
canonical identity: every repeat is the same vector); the text with k different
leading/trailing whitespace (inputs the guard sees as different and the model barely does);
k near-paraphrases (the task's eight phrasings of the same sum, each with whitespace forms).
The error is 1 - cos(average, true vector of the text).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openai
import yaml

from guard_server.config.schema import TierPolicy
from guard_server.defences.embeddings import VectorHardening, harden_vector
from guard_server.pipeline.auth import hash_key
from guard_server.teacher import EMBEDDING_MODEL_NAME, MODEL_DIR, task
from guard_server.testing import (
    DEFAULT_POLICY,
    GuardProcess,
    free_port,
    running_vllm,
    vllm_process,
    write_config,
)
from load_tests.attacks.common import DEFAULT_KEY, PORTS, SECRET, TRUSTED_KEY

NOISES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
AVERAGED = (1, 4, 16, 64)
BATCH = 256  # inputs per request (the trusted tier allows 2048, the default 256)
NEIGHBOURS = 10
PADDING = tuple("".join(chars) for n in range(5) for chars in itertools.product(" \n\t", repeat=n))
"""Whitespace runs to put before a text, shortest first ("" first)."""


def sweep_key(noise: float) -> str:
    """The key of the sweep client whose tier adds ``noise``."""
    return f"sk-embed-sweep-{noise:g}"


# --------------------------------------------------------------------------- texts


def corpus(n: int, seed: int) -> list[task.Problem]:
    """``n`` task problems with distinct questions (training split)."""
    seen: dict[str, task.Problem] = {}
    for problem in task.make_problems(4 * n, seed, "train"):
        seen.setdefault(problem.question, problem)
        if len(seen) == n:
            break
    return list(seen.values())


def whitespace_forms(text: str, k: int) -> list[str]:
    """``k`` (at most 64) forms of ``text`` that differ only in leading whitespace (the
    teacher pools the last token's state, so the end of the text is left alone); the first
    is ``text`` itself."""
    return [pad + text for pad in PADDING[:k]]


def paraphrases(problem: task.Problem, k: int) -> list[str]:
    """``k`` (at most 64) near-paraphrases of the problem: the task's phrasings of the same
    sum, each with leading whitespace, interleaved so that any prefix mixes phrasings."""
    a, b = task.encode(problem.a), task.encode(problem.b)
    phrasings = [template.format(a=a, b=b) for template in task.QUESTION_TEMPLATES]
    count = len(phrasings)
    return [PADDING[i // count] + phrasings[i % count] for i in range(k)]


# --------------------------------------------------------------------------- the stack


@contextlib.contextmanager
def embedding_stack(embed_url: str | None, workdir: Path | None) -> Iterator[str]:
    """vLLM serving the teacher as an embedding model (unless ``embed_url``), and a guard in
    front of it with the shipped tiers plus one sweep tier per noise level; yields the
    guard's base URL (``…/v1``)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embed-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if embed_url is None:
            vllm = vllm_process(MODEL_DIR, workdir / "vllm.log", ports=PORTS, embeddings=True)
            print(f"starting embedding vLLM at {vllm.url} ...", file=sys.stderr, flush=True)
            stack.enter_context(running_vllm(vllm))
            embed_url = vllm.url
        config = _write_config(workdir, embed_url)
        guard = GuardProcess(config, workdir / "guard.log", port=free_port(PORTS))
        stack.enter_context(guard)
        yield guard.base_url


def _write_config(directory: Path, embed_url: str) -> Path:
    tiers = yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]
    for policy in tiers.values():
        policy["detection"] = {**(policy.get("detection") or {}), "enabled": False}
    clients = {
        "embed-trusted": {"tier": "trusted", "keys": [hash_key(TRUSTED_KEY)]},
        "embed-default": {"tier": "default", "keys": [hash_key(DEFAULT_KEY)]},
    }
    for noise in NOISES:
        name = f"sweep-{noise:g}"
        tier = json.loads(json.dumps(tiers["default"]))
        tier["embeddings"] = {**tier.get("embeddings", {}), "noise": noise}
        tiers[name] = tier
        clients[name] = {"tier": name, "keys": [hash_key(sweep_key(noise))]}
    (directory / "tiers.yaml").write_text(yaml.safe_dump({"tiers": tiers}))
    (directory / "clients.yaml").write_text(yaml.safe_dump({"clients": clients}))
    (directory / "secret").write_bytes(SECRET)
    return write_config(
        directory,
        [embed_url],
        model=EMBEDDING_MODEL_NAME,
        policies=["tiers.yaml", "clients.yaml"],
        upstream={"timeouts": {"connect": 5, "read": 120, "total": 600}},
        secret={"file": str(directory / "secret")},
    )


def embed(base_url: str, key: str, texts: Sequence[str]) -> np.ndarray:
    """The vectors the guard returns for ``texts`` to the client with ``key`` (one row each),
    through the official SDK (base64, as the SDK asks by default)."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
    rows: list[list[float]] = []
    for start in range(0, len(texts), BATCH):
        reply = client.embeddings.create(
            model=EMBEDDING_MODEL_NAME, input=list(texts[start : start + BATCH])
        )
        rows += [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
    return np.asarray(rows, dtype=np.float64)


# --------------------------------------------------------------------------- measures


def unit(rows: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def nearest(vectors: np.ndarray, k: int) -> np.ndarray:
    """For each row, the indices of its ``k`` most cosine-similar other rows, nearest first."""
    rows = unit(vectors)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


@dataclass(frozen=True, slots=True)
class Retrieval:
    """How a tier's vectors rank neighbours, against the true vectors."""

    recall_at_10: float
    top1: float
    cosine_to_true: float


def retrieval(true: np.ndarray, served: np.ndarray) -> Retrieval:
    """Recall@10 and top-1 agreement of the served vectors' neighbours with the true ones."""
    truth, got = nearest(true, NEIGHBOURS), nearest(served, NEIGHBOURS)
    recall = np.mean([len(set(a) & set(b)) / NEIGHBOURS for a, b in zip(truth, got, strict=True)])
    top1 = float(np.mean(truth[:, 0] == got[:, 0]))
    cosine = float(np.mean(np.sum(unit(true) * unit(served), axis=1)))
    return Retrieval(float(recall), top1, cosine)


def averaged_error(true: np.ndarray, answers: np.ndarray, counts: Sequence[int]) -> list[float]:
    """Mean over targets of 1 - cos(mean of the first k answers, true vector), for each k.

    ``true``: targets x d; ``answers``: targets x max(counts) x d."""
    errors = []
    for k in counts:
        average = unit(answers[:, :k].mean(axis=1))
        errors.append(float(np.mean(1.0 - np.sum(average * unit(true), axis=1))))
    return errors


def _neighbour_gap(true: np.ndarray) -> tuple[float, float]:
    """Mean cosine of each text to its nearest and to its 10th nearest other text."""
    rows = unit(true)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    ordered = -np.sort(-similarity, axis=1)
    return float(ordered[:, 0].mean()), float(ordered[:, NEIGHBOURS - 1].mean())


# --------------------------------------------------------------------------- the run


def run(base_url: str, n_texts: int, n_targets: int, seed: int) -> dict:
    """Measure retrieval per noise level and the averaging attacks; return the figures."""
    problems = corpus(n_texts, seed)
    texts = [p.question for p in problems]
    true = embed(base_url, TRUSTED_KEY, texts)
    tiers = {f"noise {noise:g}": sweep_key(noise) for noise in NOISES}
    tiers["default (as shipped)"] = DEFAULT_KEY
    result: dict = {"texts": len(texts), "dimensions": int(true.shape[1])}
    result["neighbour_cosines"] = _neighbour_gap(true)
    result["retrieval"] = {
        name: asdict(retrieval(true, embed(base_url, key, texts))) for name, key in tiers.items()
    }
    targets = problems[:n_targets]
    most = max(AVERAGED)
    families = {
        "repeat": [[p.question] * most for p in targets],
        "whitespace": [whitespace_forms(p.question, most) for p in targets],
        "paraphrase": [paraphrases(p, most) for p in targets],
    }
    truth = true[:n_targets]
    attacks: dict[str, dict[str, list[float]]] = {}
    keys = {"trusted (no noise)": TRUSTED_KEY, **tiers}
    for family, inputs in families.items():
        flat = [text for group in inputs for text in group]
        attacks[family] = {}
        for name, key in keys.items():
            if family == "repeat" and name.startswith("trusted"):
                continue  # repeats of exact vectors are the vector itself
            answers = embed(base_url, key, flat).reshape(len(targets), most, -1)
            attacks[family][name] = averaged_error(truth, answers, AVERAGED)
    attacks["repeat"].update(_fresh_noise_curves(truth, seed))
    result["averaging"] = attacks
    return result


def _fresh_noise_curves(truth: np.ndarray, seed: int) -> dict[str, list[float]]:
    """Offline, on the true vectors: the shipped default tier's noise and quantization drawn
    with a fresh key per query, as unkeyed noise would be (and as k different clients get
    it: the key holds the client). What averaging would gain if repeats were not the same."""
    policy = TierPolicy.model_validate(
        yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]["default"]
    )
    rng = np.random.default_rng(seed)
    most = max(AVERAGED)
    curves = {}
    for label, noise in (
        ("noise", policy.embeddings.noise),
        ("flagged_noise", policy.embeddings.flagged_noise),
    ):
        hardening = VectorHardening(noise, policy.embeddings.quantize_bits)
        answers = np.stack(
            [[harden_vector(v, hardening, rng.bytes(16)) for _ in range(most)] for v in truth]
        )
        name = f"default's {label} {noise:g}, fresh key per query (offline)"
        curves[name] = averaged_error(truth, answers, AVERAGED)
    return curves


def markdown(result: dict) -> str:
    """The figures as the tables docs/evaluation.md shows."""
    near, tenth = result["neighbour_cosines"]
    lines = [
        f"{result['texts']} texts, {result['dimensions']} dimensions; true vectors: a text's "
        f"nearest other at cosine {near:.3f} on average, its 10th nearest at {tenth:.3f}.",
        "",
        "| tier | recall@10 | top-1 same | cosine to true |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["retrieval"].items():
        lines.append(
            f"| {name} | {row['recall_at_10']:.3f} | {row['top1']:.3f} | "
            f"{row['cosine_to_true']:.4f} |"
        )
    for family, curves in result["averaging"].items():
        header = " | ".join(f"k = {k}" for k in AVERAGED)
        lines += ["", f"Averaging attack, {family}: 1 - cos(average of k, true vector)", ""]
        lines += [f"| tier | {header} |", "|---|" + "---:|" * len(AVERAGED)]
        for name, errors in curves.items():
            lines.append(f"| {name} | " + " | ".join(f"{e:.5f}" for e in errors) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the measurement and print the tables (``--json``: also write the figures)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--embed-url", default=None, help="reuse a running embedding vLLM (no /v1)")
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and configs here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with embedding_stack(args.embed_url, args.workdir) as base_url:
        result = run(base_url, args.texts, args.targets, args.seed)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
