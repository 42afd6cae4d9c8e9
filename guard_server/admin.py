"""The admin API: review clients (list, explain, reset, pin). Protected by a separate key.

Every change is written to the audit log as its own record (``{"event": "pin" | "reset",
...}``: who, what, when) and to the process log.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import logging
import time
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from guard_server.appkeys import AUDIT, REVIEW, SETTINGS, STATE
from guard_server.config.loader import Client
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import ACTIONS, Assessment, assess
from guard_server.errors import GuardError, bad_request, unauthorized
from guard_server.pipeline.plan import assessed_for_score, planned_action
from guard_server.state.base import StateUnavailable
from guard_server.state.review import PIN_ACTIONS, Pin, board_score

log = logging.getLogger(__name__)

MAX_PAGE = 1000
DEFAULT_PAGE = 50
MAX_PIN_S = 365 * 24 * 3600.0
_MAX_TEXT = 256  # characters of `by` and `note`


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


def _client(request: web.Request) -> Client:
    client_id = request.match_info["client_id"]
    client = request.app[SETTINGS].current.clients_by_id.get(client_id)
    if client is None:
        raise GuardError(404, f"No client `{client_id}` is configured.", code="client_not_found")
    return client


def _unavailable(exc: StateUnavailable) -> GuardError:
    return GuardError(503, f"State backend unavailable: {exc}", type="server_error")


def _standing(client: Client, assessed: str, pin: Pin | None) -> dict[str, Any]:
    """What is done to the client now, and why it differs from the score, if it does."""
    return {
        "assessed": assessed,
        "action": planned_action(client, assessed, pin),
        "mode": client.detection_mode,
        "pin": pin.to_json() if pin is not None else None,
    }


async def list_clients(request: web.Request) -> web.Response:
    """``GET /admin/clients``: configured clients by score, highest first, one page at a time.

    Query: ``action`` (what is done now) and ``assessed`` (what the score calls for) filter;
    ``limit`` (1-1000, default 50); ``cursor`` (``next_cursor`` of the previous page). The
    score is the client's last assessment on any replica (within one review tick); clients
    never scored have ``score: null`` and come last.
    """
    _check_admin(request)
    query = request.query
    wanted = {name: query.get(name) for name in ("action", "assessed")}
    for name, value in wanted.items():
        if value is not None and value not in ACTIONS:
            raise bad_request(f"`{name}` must be one of {', '.join(ACTIONS)}.", param=name)
    limit = _limit(query.get("limit"))
    after = _decode_cursor(query["cursor"]) if "cursor" in query else None
    review = request.app[REVIEW]
    try:
        board = await review.board()
    except StateUnavailable as exc:
        raise _unavailable(exc) from None
    rows = []
    for client_id, client in request.app[SETTINGS].current.clients_by_id.items():
        value = board.get(client_id)
        score = None if value is None else board_score(value)
        assessed = "pass" if score is None else assessed_for_score(client, score)
        row = {
            "client": client_id,
            "tier": client.tier.name,
            "score": score,
            **_standing(client, assessed, review.pin_of(client_id)),
        }
        if all(value is None or row[name] == value for name, value in wanted.items()):
            rows.append((_sort_key(score, client_id), row))
    rows.sort(key=lambda item: item[0])
    matching = len(rows)
    if after is not None:
        rows = [item for item in rows if item[0] > after]
    page = rows[:limit]
    more = len(rows) > limit
    return web.json_response(
        {
            "object": "list",
            "data": [row for _, row in page],
            "total": matching,
            "next_cursor": _encode_cursor(page[-1][0]) if more else None,
        }
    )


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise bad_request(f"`limit` must be an integer from 1 to {MAX_PAGE}.", param="limit")
    return limit


def _sort_key(score: float | None, client_id: str) -> tuple[float, str]:
    """Highest score first, then by id; never-scored clients last."""
    return (-score if score is not None else 1.0, client_id)


def _encode_cursor(key: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, client_id = orjson.loads(raw)
        return float(score), str(client_id)
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise bad_request("`cursor` is not one this API returned.", param="cursor") from None


async def client_report(request: web.Request) -> web.Response:
    """``GET /admin/clients/{id}``: score, contributing signals, what is done now (with the
    pin, if any) and the raw profile, read afresh from the state store."""
    _check_admin(request)
    client = _client(request)
    try:
        profile, campaign = await request.app[STATE].peek(client.id)
    except StateUnavailable as exc:
        raise _unavailable(exc) from None
    pin = request.app[REVIEW].pin_of(client.id)
    body: dict[str, object] = {"client": client.id, "tier": client.tier.name}
    if profile is None:
        body.update(score=0.0, **_standing(client, "pass", pin), signals={})
        body.update(profile=None, campaign=None)
        return web.json_response(body)
    assessment = _assess(client, profile, campaign)
    body.update(
        score=assessment.score,
        **_standing(client, _assessed(client, assessment), pin),
        signals=assessment.signals(),
        thresholds=client.tier.detection.thresholds.by_action,
        profile={
            **dataclasses.asdict(profile),
            "regularity": round(profile.regularity, 4),
            "novelty": round(profile.novelty, 4),
        },
        campaign=dataclasses.asdict(campaign) if campaign else None,
    )
    return web.json_response(body)


def _assess(client: Client, profile: ClientProfile, campaign: CampaignProfile | None) -> Assessment:
    detection = client.tier.detection
    return assess(
        profile, campaign, detection.thresholds.by_action, detection.distinct_prompts.bounds
    )


def _assessed(client: Client, assessment: Assessment | None) -> str:
    if assessment is None or not client.tier.detection.enabled:
        return "pass"
    return assessment.action


async def reset_client(request: web.Request) -> web.Response:
    """``POST /admin/clients/{id}/reset``: forget the client's risk profile on every replica.

    Body (optional): ``{"by": "...", "note": "..."}``. The rate-limit buckets and the pin
    are kept. Answers the score the client had before (``null``: no profile).
    """
    _check_admin(request)
    client = _client(request)
    body = await _json_body(request, required=False)
    by, note = _text(body, "by"), _text(body, "note")
    try:
        profile, campaign = await request.app[STATE].peek(client.id)
        await request.app[REVIEW].reset(client.id)
    except StateUnavailable as exc:
        raise _unavailable(exc) from None
    assessment = _assess(client, profile, campaign) if profile is not None else None
    before = {
        "score": assessment.score if assessment is not None else None,
        "assessed": _assessed(client, assessment),
        "requests": profile.total if profile is not None else 0,
    }
    change = {"client": client.id, "tier": client.tier.name, "by": by, "note": note}
    _record(request, "reset", {**change, "before": before})
    return web.json_response({**change, "reset": True, "before": before})


async def pin_client(request: web.Request) -> web.Response:
    """``PUT /admin/clients/{id}/pin``: set what is done to the client whatever its score.

    Body: ``{"action": "allow" | "deny" | "auto", "expires_in_s": N | "until": ISO 8601,
    "by": "...", "note": "..."}``. ``allow`` serves the client as ``pass``, ``deny``
    refuses it with 403, until the expiry (required, at most a year); ``auto`` removes the
    pin, so the score decides again. Takes effect at once on every replica.
    """
    _check_admin(request)
    client = _client(request)
    body = await _json_body(request, required=True)
    action = body.get("action")
    if action not in (*PIN_ACTIONS, "auto"):
        raise bad_request("`action` must be `allow`, `deny` or `auto`.", param="action")
    by, note = _text(body, "by"), _text(body, "note")
    now = time.time()
    pin = None if action == "auto" else Pin(action, _expiry(body, now), by, note, round(now, 3))
    review = request.app[REVIEW]
    previous = review.pin_of(client.id)
    try:
        await review.set_pin(client.id, pin)
    except StateUnavailable as exc:
        raise _unavailable(exc) from None
    shown = pin.to_json() if pin is not None else None
    change = {"client": client.id, "tier": client.tier.name, "action": action, "by": by}
    _record(
        request,
        "pin",
        {
            **change,
            "note": note,
            "until": pin.until if pin else None,
            "previous": previous.to_json() if previous else None,
        },
    )
    return web.json_response({"client": client.id, "pin": shown})


def _expiry(body: dict[str, Any], now: float) -> float:
    """The pin's expiry (Unix time) from ``expires_in_s`` or ``until``: exactly one."""
    seconds, until = body.get("expires_in_s"), body.get("until")
    if (seconds is None) == (until is None):
        raise bad_request(
            "Give the pin an expiry: exactly one of `expires_in_s` (seconds) or `until` "
            "(ISO 8601 with a time zone).",
            param="expires_in_s",
        )
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise bad_request("`expires_in_s` must be a number.", param="expires_in_s")
        expiry = now + float(seconds)
    else:
        expiry = _parse_time(until)
    if not now < expiry <= now + MAX_PIN_S:
        raise bad_request(
            "A pin must expire in the future and within a year.",
            param="expires_in_s" if seconds is not None else "until",
        )
    return expiry


def _parse_time(value: object) -> float:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment.timestamp()
    raise bad_request(
        "`until` must be an ISO 8601 time with a time zone, e.g. 2030-01-31T12:00:00Z.",
        param="until",
    )


async def _json_body(request: web.Request, required: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip() and not required:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise bad_request(f"`{name}` must be a string of at most {_MAX_TEXT} characters.", name)
    return value


def _record(request: web.Request, event: str, fields: dict[str, Any]) -> None:
    """Write an operator's change to the audit log and the process log."""
    fields = {**fields, "remote": request.remote}
    request.app[AUDIT].event(event, fields)
    log.info("admin %s: %s", event, orjson.dumps(fields).decode())
