"""A chat application's end users over simulated days (issue 17, item 8), short: honest end
users are never perturbed or decoyed, an abusive one is acted on alone and fast, and one
inventing ids is seen by the key and acted on among the key's newcomers of its shape
(``python -m load_tests.campaign.endusers`` is the long run, docs/evaluation.md "End users
inside one key")."""

from __future__ import annotations

from load_tests.campaign.endusers import run

SEED = 5  # not one of the documented seeds (0, 1; hold-out 2)


def test_a_chat_app_without_logprobs() -> None:
    report = run(SEED, end_users=150, days=8.0)
    honest = report["honest"]
    assert honest["active"] > 80 and honest["requests"] > 1500
    assert honest["max_requests_of_one"] > 150  # a long-lived chat user among them
    assert honest["ever_by_own_scope"]["tighten"] == 0
    assert honest["ever"]["perturb"] == 0  # nothing changes an honest user's answers
    # Honest traffic alone never flags the key: only the rotating script (from day 7) does.
    assert min(report["key"]["first_day"].values(), default=7.0) >= 7.0
    scraper, rotator = report["abusive"][f"scraper{SEED}"], report["abusive"][f"rotator{SEED}"]
    assert scraper["worst_by_own_scope"] == "tighten"  # no logprobs: volume and template only
    assert scraper["first"]["tighten"]["request"] <= 200
    assert rotator["worst_by_own_scope"] == "pass"  # each invented id is new...
    assert rotator["first"]["tighten"]["request"] <= 300  # ...but the key sees them all


def test_a_chat_app_that_shows_logprobs() -> None:
    report = run(SEED, end_users=150, days=8.0, logprobs=True)
    honest = report["honest"]
    assert honest["ever_by_own_scope"]["perturb"] == 0
    scraper = report["abusive"][f"scraper{SEED}"]
    assert scraper["worst_by_own_scope"] in ("decoy", "block")
    assert scraper["first"]["decoy"]["request"] <= 100
    # The key's own score calls for decoy once the scripts run, but the key's text-side
    # actions reach no end user: the script inventing ids is decoyed among the key's
    # newcomers of its shape, and no honest end user's answers change.
    assert "decoy" in report["key"]["first_day"]
    assert honest["ever"]["perturb"] == 0
    rotator = report["abusive"][f"rotator{SEED}"]
    assert rotator["worst_by_newcomers_scope"] in ("decoy", "block")
    assert rotator["first"]["decoy"]["by"] == "newcomers"
    assert rotator["first"]["decoy"]["request"] <= 150
