"""The admin API: review clients (list, explain, reset, pin). Protected by a separate key.

Every change is written to the audit log as its own record (``{"event": "pin" | "reset",
...}``: who, what, when) and to the process log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from guard_server.appkeys import AUDIT, REVIEW, SETTINGS, STATE
from guard_server.config.loader import Client
from guard_server.detection.end_users import assess_key, assess_scope, client_of_scope
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import ACTIONS, Assessment
from guard_server.errors import GuardError, bad_request, unauthorized
from guard_server.pipeline.plan import planned_action
from guard_server.state.base import StateUnavailable
from guard_server.state.review import (
    PIN_ACTIONS,
    Pin,
    ReviewState,
    board_action,
    board_range,
    board_score,
)

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
    """The client the path names; for an end user's scope (``acme~u:<hash>``, from the audit
    log's ``scope``), its key's client under the scope's id, so that show, pin and reset
    act on that end user alone."""
    scope = request.match_info["client_id"]
    client_id = client_of_scope(scope)
    client = request.app[SETTINGS].current.clients_by_id.get(client_id)
    if client is None:
        raise GuardError(404, f"No client `{client_id}` is configured.", code="client_not_found")
    return client if scope == client_id else dataclasses.replace(client, id=scope)


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
    """``GET /admin/clients``: the clients on the review board, one page at a time.

    The board holds each client's last assessment on any replica (within one review tick),
    for as long as its risk profile lives. Order: by the action the score called for, then
    by score, highest first (within one tier, simply by score). Query: ``assessed`` (only
    clients whose score called for that action), ``pinned=true`` (only clients with a pin in
    force), ``limit`` (1-1000, default 50), ``offset`` (``next_offset`` of the last page).
    """
    _check_admin(request)
    query = request.query
    assessed = query.get("assessed")
    if assessed is not None and assessed not in ACTIONS:
        raise bad_request(f"`assessed` must be one of {', '.join(ACTIONS)}.", param="assessed")
    limit = _integer(query, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = _integer(query, "offset", 0, 0, 10**9)
    pinned = query.get("pinned", "false")
    if pinned not in ("true", "false"):
        raise bad_request("`pinned` must be `true` or `false`.", param="pinned")
    review = request.app[REVIEW]
    try:
        if pinned == "true":
            entries, total = await _pinned_page(review, offset, limit, assessed)
        else:
            entries, total = await review.page(offset, limit, assessed)
    except StateUnavailable as exc:
        raise _unavailable(exc) from None
    clients = request.app[SETTINGS].current.clients_by_id
    rows = []
    for client_id, value in entries:
        key = client_of_scope(client_id)  # an end user's scope: its key's
        client = clients.get(key)
        if client is None:  # removed from the config; leaves the board with its profile
            continue
        scored = value >= 0
        pin = review.pin_of(client_id)
        rows.append(
            {
                "client": client_id,
                "key": key,
                "tier": client.tier.name,
                "score": board_score(value) if scored else None,
                **_standing(client, board_action(value) if scored else "pass", pin),
            }
        )
    following = offset + len(entries)
    return web.json_response(
        {
            "object": "list",
            "data": rows,
            "total": total,
            "next_offset": following if following < total else None,
        }
    )


async def _pinned_page(
    review: ReviewState, offset: int, limit: int, assessed: str | None
) -> tuple[list[tuple[str, float]], int]:
    """A page of the pinned clients (few: read whole), in board order; -1: not scored."""
    pins = list(review.pins())
    values = await review.values(pins)
    entries = [(client, values.get(client, -1.0)) for client in pins]
    if assessed is not None:
        low, high = board_range(assessed)
        entries = [(client, value) for client, value in entries if low <= value < high]
    entries.sort(key=lambda item: (item[1], item[0]), reverse=True)
    return entries[offset : offset + limit], len(entries)


def _integer(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise bad_request(f"`{name}` must be an integer from {low} to {high}.", param=name)
    return value


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
    if client_of_scope(client.id) == client.id:
        return assess_key(detection, profile, campaign)
    return assess_scope(detection, client.id, profile)  # an end user's or its newcomers'


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
