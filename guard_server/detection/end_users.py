"""End users inside one key: each end user an application names (``safety_identifier``,
else ``user``) is scored in a scope of its own next to the key's.

The key's scope still sees every request, so an application that invents a fresh id per
request hides nothing from it; the key also counts the distinct end users it names in a day
(``ClientProfile.end_users``), which past the tier's cap is a signal of its own
(``end_user_churn``) and ends the per-end-user scoring for that key. End-user scopes never
join fingerprint campaigns: the end users of one application share its scaffolding, so they
would look like a multi-key campaign; the campaign signal stays on keys.
"""

from __future__ import annotations

import hashlib

from guard_server.config.schema import DetectionPolicy
from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import ACTIONS, Assessment, assess
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


def end_user_scope(client_id: str, end_user: str) -> str:
    """The scope an end user of ``client_id`` is scored in: the key's id, ``~u:`` and 16 hex
    digits of the end user's hash (any length or character an application sends becomes a
    short store key that is safe in a URL path; the audit log has the end user as sent)."""
    digest = hashlib.blake2b(end_user.encode(), digest_size=8).hexdigest()
    return f"{client_id}{SCOPE_MARK}{digest}"


def client_of_scope(scope: str) -> str:
    """The key's id of a scope (the scope itself for a key's own)."""
    return scope.partition(SCOPE_MARK)[0]


def end_user_decides(key: Assessment | None, end_user: Assessment | None) -> bool:
    """Whether the end user's assessment calls for more than the key's (then it decides the
    action of that end user's requests, and only theirs)."""
    if end_user is None:
        return False
    return key is None or _RANK[end_user.action] > _RANK[key.action]


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
) -> tuple[Assessment, Assessment | None]:
    """Fold one request into the key's scope and the end user's, in one store call, and
    assess both: (the key's, the end user's). The end user's is None once the key named
    more than its cap of distinct end users in the day."""
    profile, campaign, mine = await store.observe_end_user(
        client_id, end_user_scope(client_id, end_user), features
    )
    key = assess_key(detection, profile, campaign)
    if profile.end_users > detection.end_users.max_distinct_per_day:
        return key, None
    own = assess(
        mine,
        None,
        detection.thresholds.by_action,
        detection.distinct_prompts.bounds,
        detection.evidence_min,
    )
    return key, own
