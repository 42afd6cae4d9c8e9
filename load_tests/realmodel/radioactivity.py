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
answers (trusted tier, T = 1) to the held-out prompts. ``--soft-label-only`` runs only that
comparison (on the cached answers of an earlier run's ``--workdir``), ``--seeds 0,1,2``
repeats its four students with other seeds to show the noise.

Collected answers (and the held-out reference) are kept in ``--workdir`` and reused by a later
run with the same one; students are trained after the lab's guard has stopped, so the vLLM is
needed only while something is still to be collected.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from dataclasses import replace
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


def soft_label_students(
    tokenizer: Tokenizer,
    default_data: list[st.Example],
    trusted_data: list[st.Example],
    heldout_examples: list[st.Example],
    heldout: list[str],
    cfg: st.StudentConfig,
    seeds: list[int],
) -> dict[str, Any]:
    """(a) the default tier's text only, (b) its text + returned top-5; (a') and (b') the
    same from the trusted tier (exact values): held-out NLL (nats per token) per seed."""
    vocab = st.build_vocab(tokenizer, [*default_data, *trusted_data, *heldout_examples], heldout)
    out: dict[str, Any] = {
        "vocab": len(vocab.real),
        "with_soft_labels": [
            sum(e.soft is not None for e in default_data),
            sum(e.soft is not None for e in trusted_data),
        ],
        "seeds": seeds,
    }
    runs = {
        "a_default_text": (default_data, False),
        "b_default_text_top5": (default_data, True),
        "a_trusted_text": (trusted_data, False),
        "b_trusted_text_top5": (trusted_data, True),
    }
    for name in runs:
        out[name] = []
    for seed in seeds:
        for name, (data, soft) in runs.items():
            net = st.train(data, vocab, replace(cfg, seed=seed), soft=soft)
            out[name].append(round(st.nll(net, vocab, heldout_examples), 3))
            print(f"soft_label seed {seed} {name} {out[name][-1]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vllm-url", default=None, help="reuse a vLLM serving SmolLM2 (plugin on)")
    ap.add_argument("--collect", default="100,200,400", help="N answers per student")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--soft-label", action="store_true")
    ap.add_argument(
        "--soft-label-only",
        action="store_true",
        help="only the soft-label comparison (no radioactivity students; implies --soft-label)",
    )
    ap.add_argument(
        "--seeds", default="0", help="student seeds of the soft-label comparison (e.g. 0,1,2)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    threads(args.threads)
    soft_label = args.soft_label or args.soft_label_only
    sizes = sorted(int(n) for n in args.collect.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="realmodel-radioactivity-"))
    model_dir = smollm2.ensure_model()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    index = token_index(tokenizer)
    train_prompts = cycled_prompts("train", max(sizes))
    heldout = open_prompts("heldout")
    cfg = st.StudentConfig(steps=args.steps, batch=args.batch)
    results: dict[str, Any] = {"collect": sizes, "steps": args.steps}

    def report(name: str, value: Any) -> None:
        results[name] = value
        print(name, json.dumps(value), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    clients = ("clean",) if args.soft_label_only else ("attacker", "clean")
    collected = {}
    # Collection needs the lab; the students are trained after it has stopped.
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

        for client in (*clients, *(("trusted",) if soft_label else ())):
            cache = workdir / f"collected-{client}.json"
            if cache.exists():
                collected[client] = json.loads(cache.read_text())
            else:
                collected[client] = generate(
                    lab.base_url, client, train_prompts, max_tokens=args.max_tokens, logprobs=5
                )
                cache.write_text(json.dumps(collected[client]))
            if client != "trusted" and not args.soft_label_only:
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
    data = {
        client: examples(tokenizer, index, train_prompts, answers)
        for client, answers in collected.items()
    }
    if not args.soft_label_only:
        for client in ("attacker", "clean"):
            for n in sizes:
                vocab = st.build_vocab(tokenizer, [*data[client][:n], *heldout_examples], heldout)
                net = st.train(data[client][:n], vocab, cfg)
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
    if soft_label:
        n = sizes[-1]
        report(
            f"soft_label/{n}",
            soft_label_students(
                tokenizer,
                data["clean"][:n],
                data["trusted"][:n],
                heldout_examples,
                heldout,
                cfg,
                seeds,
            ),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
