"""The admin API: explain a client's risk score. Protected by a separate admin key."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from aiohttp import web

from guard_server.appkeys import SETTINGS, STATE
from guard_server.detection.scoring import assess
from guard_server.errors import GuardError, unauthorized
from guard_server.state.base import StateUnavailable


def _check_admin(request: web.Request) -> None:
    expected = request.app[SETTINGS].current.config.admin.key_hash
    if expected is None:
        raise GuardError(404, "The admin API is disabled (no admin.key_hash).", code="not_found")
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("The admin API needs `Authorization: Bearer <admin key>`.")
    digest = "sha256:" + hashlib.sha256(key.strip().encode()).hexdigest()
    if not hmac.compare_digest(digest.encode(), expected.encode()):
        raise unauthorized("Incorrect admin key.")


async def client_report(request: web.Request) -> web.Response:
    """``GET /admin/clients/{id}``: score, contributing signals, action, raw profile."""
    _check_admin(request)
    settings = request.app[SETTINGS].current
    client_id = request.match_info["client_id"]
    client = settings.clients_by_id.get(client_id)
    if client is None:
        raise GuardError(404, f"No client `{client_id}` is configured.", code="client_not_found")
    try:
        profile, campaign = await request.app[STATE].peek(client_id)
    except StateUnavailable as exc:
        raise GuardError(503, f"State backend unavailable: {exc}", type="server_error") from None
    body: dict[str, object] = {"client": client_id, "tier": client.tier.name}
    if profile is None:
        body.update(score=0.0, action="pass", signals={}, profile=None, campaign=None)
        return web.json_response(body)
    detection = client.tier.detection
    thresholds = detection.thresholds.by_action
    assessment = assess(
        profile, campaign, thresholds, detection.distinct_prompts.bounds, detection.evidence_min
    )
    body.update(
        score=assessment.score,
        action=assessment.action if client.tier.detection.enabled else "pass",
        signals=assessment.signals(),
        thresholds=thresholds,
        profile={
            **dataclasses.asdict(profile),
            "regularity": round(profile.regularity, 4),
            "novelty": round(profile.novelty, 4),
        },
        campaign=dataclasses.asdict(campaign) if campaign else None,
    )
    return web.json_response(body)
