"""Small runs of the logprob-channel attacks: the trusted tier leaks, the default tier does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guard_server.teacher import task
from guard_server.testing import (
    ALICE_KEY,
    BOB_KEY,
    DEMO_KEY,
    TRUSTED_KEY,
    GuardProcess,
    model_dir_under_test,
)
from load_tests.attacks import (
    argmax_stealing,
    constrained_stealing,
    honest_cost,
    logit_stealing,
    noise_averaging,
    nonce_averaging,
    soft_label,
)
from load_tests.attacks.common import Target, default_hardening, tier_bias_limit

MODEL_DIR = model_dir_under_test()


@pytest.fixture(scope="module")
def tiers(guard: GuardProcess) -> tuple[Target, Target]:
    """The session guard as a trusted-tier and a default-tier attacker."""
    return Target(guard.url, TRUSTED_KEY, "trusted"), Target(guard.url, DEMO_KEY, "default")


@pytest.fixture(scope="module")
def tokenizer():
    return logit_stealing.load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def hidden_size() -> int:
    return int(json.loads((MODEL_DIR / "config.json").read_text())["hidden_size"])


def test_logit_vectors_give_the_exact_hidden_size_on_the_trusted_tier(
    tiers: tuple[Target, Target], tokenizer, hidden_size: int
) -> None:
    trusted, _ = tiers
    n = hidden_size + 24
    reports, _ = logit_stealing.run_attack(
        [trusted], tokenizer, n_contexts=n, columns=0, methods=["token-ids"]
    )
    assert reports[0].estimate.vectors == n
    assert reports[0].estimate.hidden == hidden_size


def test_logit_bias_forces_raw_logprobs_out_but_does_not_move_the_top_k(
    tiers: tuple[Target, Target], tokenizer
) -> None:
    """vLLM returns raw logprobs: a +100 bias leaves the top-k as it was (so the paper's
    block sweep gains nothing), but the forced token's own exact logprob comes back."""
    trusted, _ = tiers
    strings = logit_stealing.token_strings(tokenizer)
    columns = logit_stealing.column_set(tokenizer, 40, seed=1)
    prompts = logit_stealing.contexts(2, seed=1, tokenizer=tokenizer)
    exact = logit_stealing.harvest_token_ids(trusted, prompts, columns).matrix
    forced = logit_stealing.harvest_forced(trusted, prompts, columns, strings, 20).matrix
    np.testing.assert_allclose(forced, exact, atol=1e-4)
    topk = logit_stealing.harvest_topk(trusted, prompts, columns, strings, 20).matrix
    carlini = logit_stealing.harvest_carlini(trusted, prompts, columns, strings, 20).matrix
    assert np.all(np.isnan(carlini[:, 1:]) | ~np.isnan(topk[:, 1:]))


def test_default_tier_builds_no_logit_vectors(tiers: tuple[Target, Target], tokenizer) -> None:
    _, default = tiers
    reports, _ = logit_stealing.run_attack(
        [default],
        tokenizer,
        n_contexts=3,
        columns=40,
        methods=["carlini-topk", "forced-sample", "token-ids"],
    )
    for report in reports:
        assert report.estimate.hidden is None
        assert "400 parameter_not_allowed" in report.refusal


def test_default_hardening_alone_would_hide_the_hidden_size(
    tiers: tuple[Target, Target], tokenizer, hidden_size: int
) -> None:
    """Offline what-if: were bias allowed with logprobs, the keyed noise and grid alone
    would still move the estimate by far more than half."""
    trusted, _ = tiers
    n = hidden_size + 24
    prompts = logit_stealing.contexts(n, seed=2, tokenizer=tokenizer)
    columns = logit_stealing.column_set(tokenizer, 160, seed=2)
    exact = logit_stealing.harvest_token_ids(trusted, prompts, columns).matrix
    assert logit_stealing.estimate_hidden(exact).hidden == hidden_size
    hardened = logit_stealing.hardened_what_if(exact, prompts, columns, default_hardening(), 5)
    estimate = logit_stealing.estimate_hidden(hardened).hidden
    assert estimate is not None and abs(estimate - hidden_size) >= 0.5 * hidden_size


def test_the_emulated_greedy_oracle_matches_the_default_tier(
    tiers: tuple[Target, Target], tokenizer
) -> None:
    """The logprob-free variant (``argmax_stealing``) is emulated offline; its oracle, greedy
    token = argmax(logits + clamped bias), must be what the default tier really answers."""
    trusted, default = tiers
    prompts = logit_stealing.contexts(4, seed=3, tokenizer=tokenizer, kinds=("random",))
    exact = argmax_stealing.exact_logprobs(trusted, prompts, tokenizer.get_vocab_size())
    strings = logit_stealing.token_strings(tokenizer)
    agree, compared = argmax_stealing.verify_oracle(
        default, prompts, exact, strings, tier_bias_limit(), samples=30
    )
    assert compared >= 10
    assert agree == compared


def test_averaging_repeats_gains_nothing_under_keyed_noise(
    tiers: tuple[Target, Target], guard: GuardProcess
) -> None:
    trusted, default = tiers
    keys = [default, Target(guard.url, ALICE_KEY, "alice"), Target(guard.url, BOB_KEY, "bob")]
    result = noise_averaging.run_attack(trusted, keys, n_prompts=6, repeats=(1, 2, 4, 8))
    keyed = result.curves["default (keyed noise)"]
    iid = next(v for name, v in result.curves.items() if name.startswith("i.i.d."))
    assert max(result.curves["trusted"]) < 1e-6
    assert keyed[0] > 0.3
    assert max(keyed) - min(keyed) < 1e-9  # flat: repeats return the same numbers
    assert iid[-1] < 0.5 * iid[0]  # what fresh noise would have allowed


def test_default_tier_soft_targets_add_nothing_to_the_text_at_the_answer_digits(
    tiers: tuple[Target, Target],
) -> None:
    """Too small to train a student in a test: checks the targets a student would learn from.

    At the answer's digits (what held-out accuracy is about) the teacher is near certain, so
    the text alone, a one-hot on the emitted digit, is within 0.01 nats of its distribution,
    and so is the trusted tier's top-20. The default tier returns a confident sampled digit's
    value exact and squeezes the rest under it: a target within 0.001 nats of the text's own,
    not the hardened values' confidence penalty (0.78 nats off, which helped a student).
    """
    trusted, default = tiers
    problems = task.make_problems(60, soft_label.TRAIN_SEED, "train")
    truth = soft_label.collect(trusted, problems, 20)
    hardened = soft_label.collect(default, problems, 20)
    assert [a.text for a in truth] == [a.text for a in hardened]
    assert max(len(t) for a in hardened for t in a.top) <= 6  # top-5 plus the sampled token
    text_kl, trusted_kl = soft_label.target_divergence(truth, truth, digits_only=True)
    _, default_kl = soft_label.target_divergence(truth, hardened, digits_only=True)
    assert text_kl < 0.01
    assert trusted_kl < 0.01
    assert abs(default_kl - text_kl) < 1e-3
    _, everywhere_trusted_kl = soft_label.target_divergence(truth, truth)
    _, everywhere_default_kl = soft_label.target_divergence(truth, hardened)
    assert everywhere_default_kl > everywhere_trusted_kl + 0.05  # unsure openings: hardened


def test_honest_clients_keep_their_answers_and_their_calibration(
    tiers: tuple[Target, Target],
) -> None:
    """The answer's digits are confident, so the default tier returns their values exact."""
    problems = task.make_problems(100, seed=1, split="heldout")
    trusted, default = (honest_cost.measure(t, problems, 0.0) for t in tiers)
    assert trusted.accuracy == default.accuracy
    assert trusted.answer_ece < 0.05
    assert default.answer_ece < 0.05


def test_variants_the_model_reads_alike_draw_no_fresh_noise(
    tiers: tuple[Target, Target],
) -> None:
    """An ignored message key is refused; every accepted variant gets the same numbers."""
    trusted, default = tiers
    families = ("nonce key", "message name", "seed", "key order", "json spacing")
    result = nonce_averaging.run_attack(
        trusted, default, n_prompts=2, repeats=(1, 2, 4), families=families
    )
    by_name = {f.family: f for f in result.families}
    assert by_name["nonce key"].errors == [None, None, None]
    assert "400 unknown_parameter" in by_name["nonce key"].refusal
    for name in families[1:]:
        errors = by_name[name].errors
        assert not by_name[name].refusal
        assert errors[0] is not None and errors[0] > 0.3
        assert max(errors) - min(errors) < 1e-9  # flat: every variant, the same noise


def test_constrained_decoding_gives_exact_logit_differences_on_the_trusted_tier_only(
    tiers: tuple[Target, Target], tokenizer
) -> None:
    trusted, default = tiers
    strings = logit_stealing.token_strings(tokenizer)
    columns = constrained_stealing.constrained_columns(tokenizer, 40, seed=1)
    prompts = logit_stealing.contexts(2, seed=1, tokenizer=tokenizer)
    exact = logit_stealing.harvest_token_ids(trusted, prompts, columns).matrix
    stolen = constrained_stealing.harvest_constrained(trusted, prompts, columns, strings)
    assert stolen.coverage() > 0.95
    found = ~np.isnan(stolen.matrix)
    np.testing.assert_allclose(stolen.matrix[found], (exact - exact[:, :1])[found], atol=1e-3)
    refused = constrained_stealing.harvest_constrained(default, prompts, columns, strings)
    assert refused.usable.shape[0] == 0
    assert refused.coverage() == 0
    assert refused.queries == len(columns) - 1  # stops after the first context
    assert "400 parameter_not_allowed" in refused.refusals.most_common(1)[0][0]
