"""Radioactivity and soft labels on SmolLM2: students of N collected answers.

    .venv/bin/python -m load_tests.realmodel.radioactivity [--vllm-url URL] \
        --collect 100,200,400 [--steps 600] [--soft-label]

The attacker (watermark at the policy default, gamma 0.25, delta 2) and a clean client (the
default tier, no watermark) each collect answers to open-ended training prompts
(``questions.open_prompts("train")``, cycled with new seeds) at T = 1, with the default tier's
top-5 logprobs. For each N a fresh student (``realmodel.student``: 2 layers, hidden 128,
on the tokens its data uses) learns from the first N answers, samples answers to the 60
held-out prompts at T = 1, and ``guard-server trace``'s test scores them against every key
(the client named when p x keys < 1e-6).

``--soft-label`` adds the soft-label comparison at the largest N: a student of the default
tier's text only (a) against one of the text plus the returned top-5 (b), and the same pair
from the trusted tier (exact values), scored by their held-out NLL of the teacher's own
answers (trusted tier, T = 1) to the held-out prompts.

Collected answers are kept in ``--workdir`` and reused by a later run with the same one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from guard_server.config.loader import load_settings
from guard_server.trace import tokenize, trace
from guard_server.upstream import smollm2
from load_tests.attacks.common import threads
from load_tests.realmodel import stack
from load_tests.realmodel import student as st
from load_tests.realmodel.questions import open_prompts
from load_tests.realmodel.watermark import cycled_prompts, generate


def token_index(tokenizer: Tokenizer) -> dict[str, int]:
    """Decoded text of a single token -> its id, for texts only one token decodes to."""
    counts: Counter[str] = Counter()
    texts = {}
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        texts[token_id] = text
        counts[text] += 1
    return {text: i for i, text in texts.items() if counts[text] == 1 and "\ufffd" not in text}


def examples(
    tokenizer: Tokenizer,
    index: dict[str, int],
    prompts: list[str],
    answers: list[dict[str, Any]],
) -> list[st.Example]:
    """Training examples; soft labels only where re-tokenising the text gives the API's
    tokens (else the example is text only)."""
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer.encode(answer["text"], add_special_tokens=False).ids
        soft = None
        returned = answer["logprobs"]
        if returned and [tokenizer.decode([i]) for i in ids] == [r["token"] for r in returned]:
            soft = [{index[t]: v for t, v in r["top"].items() if t in index} for r in returned]
        out.append(st.Example(st.chat_prompt_ids(tokenizer, prompt), ids, soft))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vllm-url", default=None, help="reuse a vLLM serving SmolLM2 (plugin on)")
    ap.add_argument("--collect", default="100,200,400", help="N answers per student")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--soft-label", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    threads(args.threads)
    sizes = sorted(int(n) for n in args.collect.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="realmodel-radioactivity-"))
    model_dir = smollm2.ensure_model()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    index = token_index(tokenizer)
    train_prompts = cycled_prompts("train", max(sizes))
    heldout = open_prompts("heldout")
    results: dict[str, Any] = {"collect": sizes, "steps": args.steps}

    def report(name: str, value: Any) -> None:
        results[name] = value
        print(name, json.dumps(value), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    with stack.running_lab(workdir, args.vllm_url) as lab:
        settings = load_settings(lab.config)

        def traced(texts: list[str]) -> dict[str, Any]:
            verdict = trace(settings, tokenize(texts, model_dir), stack.GAMMA, 1e-6)
            scores = {s.client: s.score for s in verdict.scores}
            others = [s for c, s in scores.items() if c != "attacker"]
            return {
                "named": verdict.named,
                "keys": len(scores),
                "attacker_z": round(scores["attacker"].z, 2),
                "attacker_p": scores["attacker"].p_value,
                "scored": scores["attacker"].scored,
                "others_p_gt_0.01": sum(s.p_value > 0.01 for s in others),
                "others": len(others),
                "others_max_abs_z": round(max(abs(s.z) for s in others), 2),
            }

        collected = {}
        for client in ("attacker", "clean", *(("trusted",) if args.soft_label else ())):
            cache = workdir / f"collected-{client}.json"
            if cache.exists():
                collected[client] = json.loads(cache.read_text())
            else:
                collected[client] = generate(
                    lab.base_url, client, train_prompts, max_tokens=args.max_tokens, logprobs=5
                )
                cache.write_text(json.dumps(collected[client]))
            if client != "trusted":
                texts = [a["text"] for a in collected[client]]
                report(f"trace/{client}_collected", traced(texts))
        cache = workdir / "reference-heldout.json"
        if cache.exists():
            reference = json.loads(cache.read_text())
        else:
            reference = generate(
                lab.base_url, "trusted", heldout, max_tokens=args.max_tokens, temperature=1.0
            )
            cache.write_text(json.dumps(reference))
        heldout_examples = examples(tokenizer, index, heldout, reference)
        if args.soft_label:
            trusted = examples(tokenizer, index, train_prompts, collected["trusted"])

        def soft_labels(
            default_data: list[st.Example], trusted_data: list[st.Example]
        ) -> dict[str, Any]:
            """(a) text only [the clean student above], (b) text + the default tier's top-5;
            (a') and (b') the same from the trusted tier (exact values)."""
            cfg = st.StudentConfig(steps=args.steps, batch=args.batch)
            vocab = st.build_vocab(
                tokenizer, [*default_data, *trusted_data, *heldout_examples], heldout
            )
            out: dict[str, Any] = {
                "with_soft_labels": [
                    sum(e.soft is not None for e in default_data),
                    sum(e.soft is not None for e in trusted_data),
                ]
            }
            runs = {
                "a_default_text": (default_data, False),
                "b_default_text_top5": (default_data, True),
                "a_trusted_text": (trusted_data, False),
                "b_trusted_text_top5": (trusted_data, True),
            }
            for name, (data, soft) in runs.items():
                net = st.train(data, vocab, cfg, soft=soft)
                out[name] = round(st.nll(net, vocab, heldout_examples), 3)
            return out

        for client in ("attacker", "clean"):
            data = examples(tokenizer, index, train_prompts, collected[client])
            for n in sizes:
                vocab = st.build_vocab(tokenizer, [*data[:n], *heldout_examples], heldout)
                cfg = st.StudentConfig(steps=args.steps, batch=args.batch)
                net = st.train(data[:n], vocab, cfg)
                texts = st.generate(net, vocab, tokenizer, heldout, max_new_tokens=args.max_tokens)
                (workdir / f"student-{client}-{n}.jsonl").write_text(
                    "".join(json.dumps({"text": t}) + "\n" for t in texts)
                )
                report(
                    f"student/{client}/{n}",
                    {
                        "vocab": len(vocab.real),
                        "heldout_nll": round(st.nll(net, vocab, heldout_examples), 3),
                        "trace": traced(texts),
                    },
                )
                if args.soft_label and client == "clean" and n == sizes[-1]:
                    report(f"soft_label/{n}", soft_labels(data[:n], trusted[:n]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
