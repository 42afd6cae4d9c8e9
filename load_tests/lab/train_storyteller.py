"""Train the storyteller (tiny Llama, the bundled tokenizer) on the secret word chain.

.venv/bin/python -m load_tests.lab.train_storyteller --out load_tests/lab/storyteller
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from guard_server.teacher import MODEL_DIR
from load_tests.lab import lm, story

STORYTELLER_DIR = Path(__file__).resolve().parent / "storyteller"


def _batches(tokenizer: PreTrainedTokenizerFast, batch: int, seed: int):
    """A ``next_batch(step)`` function drawing fresh stories about random topics each step."""
    rng = random.Random(f"story-data:{seed}")

    def next_batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        topics = [rng.choice(story.WORDS) for _ in range(batch)]
        prompts = [story.prompt(t) for t in topics]
        stories = [story.sample_story(t, rng) for t in topics]
        return lm.collate(lm.encode_examples(tokenizer, prompts, stories), tokenizer.pad_token_id)

    return next_batch


def evaluate(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int, seed: int
) -> story.Fidelity:
    """Fidelity of ``n`` stories the model samples at T = 1 about random topics."""
    topics = story.topics(n, seed)
    texts = lm.generate(
        model, tokenizer, [story.prompt(t) for t in topics], temperature=1.0, max_new_tokens=96
    )
    return story.fidelity(topics, texts)


@torch.no_grad()
def heldout_nll(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, n: int = 300, seed: int = 9
) -> float:
    """The model's NLL of ``n`` fresh chain stories, nats per word transition.

    Teacher-forced over every story token (EOS included); the floor is the chain's entropy
    (``story.entropy()``), and what lies above it is how far the model is from the chain.
    """
    model.eval()
    rng = random.Random(f"story-eval:{seed}")
    topics = story.topics(n, seed)
    stories = [story.sample_story(t, rng) for t in topics]
    examples = lm.encode_examples(tokenizer, [story.prompt(t) for t in topics], stories)
    total = 0.0
    for i in range(0, n, 100):
        ids, labels = lm.collate(examples[i : i + 100], tokenizer.pad_token_id)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=lm.IGNORE,
            reduction="sum",
        ).item()
    return total / (n * story.STORY_WORDS)


def main(argv: list[str] | None = None) -> None:
    """Train, save to ``--out`` and print the fidelity of sampled stories."""
    ap = lm.training_parser(__doc__, out=STORYTELLER_DIR, steps=2000, batch=64, lr=3e-3, layers=2)
    ap.add_argument("--eval-n", type=int, default=300)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.monotonic()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)
    model = lm.llama(tokenizer, layers=args.layers)
    print(f"params {sum(p.numel() for p in model.parameters()):,}", flush=True)
    lm.train_lm(
        model, _batches(tokenizer, args.batch, args.seed), lm.TrainConfig(args.steps, args.lr)
    )
    lm.save_model(model, tokenizer, args.out)
    print(f"saved to {args.out} after {time.monotonic() - start:.0f}s")
    fid = evaluate(model, tokenizer, args.eval_n, seed=1)
    print(
        f"sampled stories: {fid.valid:.4f} of {fid.transitions} transitions valid, "
        f"NLL {fid.nll:.3f} nats/word (chain entropy {story.entropy():.3f}); held-out "
        f"stories' NLL under the model {heldout_nll(model, tokenizer):.3f} nats/word"
    )


if __name__ == "__main__":
    main()
