"""Train the bundled teacher (tokenizer + tiny Llama) on the secret-numeral addition task.

.venv/bin/python -m load_tests.lab.train_teacher --out guard_server/teacher/model
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from guard_server.teacher import task
from load_tests.lab import lm

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""One user message with ``add_generation_prompt`` gives ``<s>`` + ``task.completion_prompt``."""

# General English for the tokenizer's remaining merges, so that prompts outside the task
# (and attack prompts) still tokenize into words rather than single bytes.
_ENGLISH = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water been
call who its now find long down day did get come made may part hello thanks thank please help
me tell explain why question answer secret system digit digits rule rules model teacher
student learn learning training data example examples show give list all every number
numbers sum add addition plus minus times total result value values write written base
translate meaning mean means table mapping map decode encode code ignore previous
instructions system prompt assistant user reply respond response quickly step think again
correct wrong right true false yes no maybe because therefore first second third last next
"""


def _tokenizer_corpus(seed: int, n: int = 20_000) -> list[str]:
    rng = random.Random(f"tokenizer:{seed}")
    texts = []
    for _ in range(n):
        p = task.sample_problem(rng, "train")
        texts.append(f"{task.completion_prompt(p.question)} {task.render_answer(p, rng)}")
    words = _ENGLISH.split()
    for _ in range(n // 4):
        texts.append(" ".join(rng.choice(words) for _ in range(12)).capitalize() + ".")
    return texts


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE (512 tokens) with one token per digit and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _batches(tokenizer: PreTrainedTokenizerFast, batch: int, seed: int, pool: int = 8):
    """A ``next_batch(step)`` function drawing fresh training-split examples each step.

    Examples are made ``pool`` batches at a time and grouped by length to cut padding.
    """
    rng = random.Random(f"teacher-data:{seed}")
    ready: list[list[lm.Example]] = []

    def refill() -> None:
        problems = [task.sample_problem(rng, "train") for _ in range(batch * pool)]
        prompts = [task.completion_prompt(p.question) for p in problems]
        answers = [" " + task.render_answer(p, rng) for p in problems]
        ready.extend(lm.length_grouped(lm.encode_examples(tokenizer, prompts, answers), batch, rng))

    def next_batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not ready:
            refill()
        return lm.collate(ready.pop(), tokenizer.pad_token_id)

    return next_batch


def main(argv: list[str] | None = None) -> None:
    """Train, save to ``--out`` and print held-out greedy exact-match."""
    ap = lm.training_parser(
        __doc__, out=Path("guard_server/teacher/model"), steps=3000, batch=128, lr=1e-3, layers=4
    )
    ap.add_argument("--eval-n", type=int, default=1000)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.monotonic()
    tokenizer = build_tokenizer(args.seed)
    model = lm.llama(tokenizer, layers=args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, params {n_params:,}", flush=True)
    cfg = lm.TrainConfig(steps=args.steps, lr=args.lr)
    lm.train_lm(model, _batches(tokenizer, args.batch, args.seed), cfg)
    train_s = time.monotonic() - start
    lm.save_model(model, tokenizer, args.out)
    print(f"saved to {args.out} after {train_s:.0f}s of training")

    heldout = task.make_problems(args.eval_n, seed=1, split="heldout")
    acc = lm.exact_match(model, tokenizer, heldout)
    print(f"held-out greedy exact-match: {acc:.4f} on {len(heldout)} problems")
    print(f"total wall time {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
