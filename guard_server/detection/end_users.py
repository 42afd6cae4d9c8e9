"""End users inside one key: each end user an application names (``safety_identifier``,
else ``user``) is scored in a scope of its own next to the key's.

Only on a tier that opts in (``detection.end_users.enabled``, off unless set: the shipped
``application`` tier): elsewhere a request naming an end user is scored as its key alone,
since the rule below would let any client dodge its key's text-side action by naming fresh
ids and varying its phrasing.

The key's scope still sees every request, so an application that invents a fresh id per
request hides nothing from it; the key also counts the distinct end users it names in a day
(``ClientProfile.end_users``), which past the tier's cap is a signal of its own
(``end_user_churn``) and ends the per-end-user scoring for that key. End-user scopes never
join fingerprint campaigns: the end users of one application share its scaffolding, so they
would look like a multi-key campaign; the campaign signal stays on keys.

**Whose score changes an end user's answers.** The key's scope sees the whole application,
so one abusive end user whose traffic dominates the key's for a while makes the key look
like it, and the key's action would hit every end user. So for a request naming an end user
the key's action stops at ``tighten`` (:func:`decide`): a text-side action (perturb, decoy,
block) comes only from a scope that holds nothing but that end user's kind of traffic:

- the end user's own scope, and
- while the end user is new (its own profile younger than ``ESTABLISHED_AGE_S``: ids an
  application invents per request never get older) and its own scope does not act on it,
  the scope of the key's *newcomers of the request's shape* (:func:`newcomer_scope`: the
  key and the request's fingerprint, that is its scaffold, template head and parameters).
  A script that names a fresh id per request sends one shape, so its requests pile up
  there, with their timing, logprobs and volume; honest newcomers ask in many shapes, and
  their arrivals are not clockwork. Every request of such a scope has the same
  fingerprint, so its ``templated`` signal is meaningless there and is not counted.

Past the tier's cap of distinct end users in a day there are no end-user scopes: the key's
action applies in full, as to a request that names no end user.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from guard_server.config.schema import DetectionPolicy
from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import ACTIONS, TEXT_ACTIONS, Assessment, assess
from guard_server.state.base import StateStore

_RANK = {action: rank for rank, action in enumerate(ACTIONS)}


def end_user_of(body: dict[str, object]) -> str | None:
    """The end user a request body names: ``safety_identifier``, else ``user`` (None:
    neither)."""
    for name in ("safety_identifier", "user"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    return None


SCOPE_MARK = "~u:"
"""Between a key's id and its end user's hash in an end-user scope (no client id has ``~``)."""
NEWCOMER_MARK = "~n:"
"""Between a key's id and a request fingerprint in the scope of the key's newcomers."""
ESTABLISHED_AGE_S = 3600.0
"""An end user whose own profile began at least this long ago has a history of its own
(ids invented per request never do); until then its requests are also scored among the
key's newcomers of their shape."""


def end_user_scope(client_id: str, end_user: str) -> str:
    """The scope an end user of ``client_id`` is scored in: the key's id, ``~u:`` and 16 hex
    digits of the end user's hash (any length or character an application sends becomes a
    short store key that is safe in a URL path; the audit log has the end user as sent)."""
    digest = hashlib.blake2b(end_user.encode(), digest_size=8).hexdigest()
    return f"{client_id}{SCOPE_MARK}{digest}"


def newcomer_scope(client_id: str, fingerprint: str) -> str:
    """The scope of ``client_id``'s new end users whose requests have ``fingerprint``."""
    return f"{client_id}{NEWCOMER_MARK}{fingerprint}"


def client_of_scope(scope: str) -> str:
    """The key's id of a scope (the scope itself for a key's own)."""
    return scope.partition("~")[0]


def established(own: ClientProfile) -> bool:
    """Whether an end user has a history of its own (see ``ESTABLISHED_AGE_S``)."""
    return own.age_s >= ESTABLISHED_AGE_S


@dataclass(slots=True)
class EndUserScores:
    """A request naming an end user, assessed: the key's scope, the end user's own (None
    past the key's cap of end users), and for a new end user its newcomers' scope."""

    key: Assessment
    own: Assessment | None
    newcomers: Assessment | None = None
    newcomers_scope: str | None = None


KEY, END_USER, NEWCOMERS = "key", "end_user", "newcomers"
"""Whose assessment decides a request (:func:`decide`)."""


def decide(
    key: Assessment | None, own: Assessment | None, newcomers: Assessment | None = None
) -> tuple[Assessment | None, str]:
    """The assessment that decides a request naming an end user, and whose it is (``KEY``,
    ``END_USER`` or ``NEWCOMERS``). Without the end user's own assessment (past the cap,
    or not scored) the key's decides as it stands. Otherwise the key's action stops at
    ``tighten`` (its note says so) and the most severe of the three decides; on a tie the
    key's, so the end user's scopes decide only when they call for more."""
    if own is None or key is None:
        return key, KEY
    if key.action in TEXT_ACTIONS:
        note = (
            f"{key.action} held at tighten for this end user: the key's score changes "
            "no end user's answers (its own scope's and its newcomers' do)"
        )
        key = Assessment(key.score, key.contributions, "tighten", note)
    best, by = key, KEY
    for assessment, whose in ((own, END_USER), (newcomers, NEWCOMERS)):
        if assessment is not None and _RANK[assessment.action] > _RANK[best.action]:
            best, by = assessment, whose
    return best, by


def assess_key(
    detection: DetectionPolicy, profile: ClientProfile, campaign: CampaignProfile | None
) -> Assessment:
    """The key's assessment under its tier's ``detection`` settings."""
    end_users = detection.end_users
    return assess(
        profile,
        campaign,
        detection.thresholds.by_action,
        detection.distinct_prompts.bounds,
        detection.evidence_min,
        end_users.max_distinct_per_day if end_users.enabled else None,
    )


async def score_with_end_user(
    store: StateStore,
    client_id: str,
    end_user: str,
    features: RequestFeatures,
    detection: DetectionPolicy,
) -> EndUserScores:
    """Fold one request into the key's scope and the end user's, in one store call, and
    assess both; for a new end user (not :func:`established`) that its own scope does not
    act on, also fold it into the scope of the key's newcomers of its shape (a second
    call) and assess that. The end user's assessment is None once the key named more than
    its cap of distinct end users in the day."""
    profile, campaign, mine = await store.observe_end_user(
        client_id, end_user_scope(client_id, end_user), features
    )
    key = assess_key(detection, profile, campaign)
    if profile.end_users > detection.end_users.max_distinct_per_day:
        return EndUserScores(key, None)
    own = assess_scope(detection, end_user_scope(client_id, end_user), mine)
    if established(mine) or own.action != "pass":  # judged on its own history
        return EndUserScores(key, own)
    scope = newcomer_scope(client_id, features.fingerprint)
    shape = await store.observe_scope(scope, features)
    return EndUserScores(key, own, assess_scope(detection, scope, shape), scope)


def assess_scope(detection: DetectionPolicy, scope: str, profile: ClientProfile) -> Assessment:
    """An end user's or newcomers' scope's assessment (no campaign, no end-user count)."""
    if NEWCOMER_MARK in scope:
        # One fingerprint is the scope: every request repeats it, which says nothing here.
        profile = replace(profile, templated_share=0.0)
    return assess(
        profile,
        None,
        detection.thresholds.by_action,
        detection.distinct_prompts.bounds,
        detection.evidence_min,
    )
