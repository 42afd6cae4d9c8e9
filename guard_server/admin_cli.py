"""``guard-server clients list|show|reset|pin``: the admin API of a running guard, from a shell.

The admin key comes from ``GUARD_ADMIN_KEY`` or from a file (``--key-file``, or
``GUARD_ADMIN_KEY_FILE``), never from an argument, which any user could read in ``ps``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from guard_server.detection.scoring import ACTIONS

KEY_ENV = "GUARD_ADMIN_KEY"
KEY_FILE_ENV = "GUARD_ADMIN_KEY_FILE"
URL_ENV = "GUARD_ADMIN_URL"
ACTOR_ENV = "GUARD_ADMIN_ACTOR"
DEFAULT_URL = "http://127.0.0.1:8080"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AdminError(Exception):
    """The guard refused the call, or could not be reached."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``clients`` and its subcommands to the ``guard-server`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=os.environ.get(URL_ENV, DEFAULT_URL), help=f"the guard (${URL_ENV})"
    )
    common.add_argument(
        "--key-file",
        type=Path,
        default=os.environ.get(KEY_FILE_ENV),
        help=f"a file holding the admin key (else ${KEY_ENV}, or ${KEY_FILE_ENV})",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    clients = commands.add_parser("clients", help="review clients through a guard's admin API")
    verbs = clients.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser(
        "list", parents=[common], help="scored clients, most severe first, then by score"
    )
    listing.add_argument("--assessed", choices=ACTIONS, help="only those the score puts here")
    listing.add_argument("--pinned", action="store_true", help="only clients with a pin")
    listing.add_argument("--limit", type=int, default=50, help="clients per page (1-1000)")
    listing.add_argument("--offset", type=int, help="where the page starts (printed with a page)")
    listing.add_argument("--all", action="store_true", help="follow every page")
    show = verbs.add_parser("show", parents=[common], help="a client's score and signals")
    show.add_argument("client")
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--note", default="", help="why (kept in the audit log)")
    who.add_argument(
        "--by",
        default=os.environ.get(ACTOR_ENV) or _whoami(),
        help=f"who does it (default ${ACTOR_ENV}, else user@host)",
    )
    reset = verbs.add_parser(
        "reset", parents=[common, who], help="forget a client's risk profile (not its limits)"
    )
    reset.add_argument("client")
    pin = verbs.add_parser("pin", parents=[common, who], help="allow or deny a client for a time")
    pin.add_argument("client")
    pin.add_argument("action", choices=("allow", "deny", "auto"), help="auto: the score decides")
    expiry = pin.add_mutually_exclusive_group()
    expiry.add_argument("--for", dest="duration", help="how long: 90s, 30m, 12h, 7d")
    expiry.add_argument("--until", help="until when: ISO 8601 with a time zone")


def run(args: argparse.Namespace) -> int:
    """Run one ``clients`` subcommand; print its result. Exit status 1 on an API error."""
    try:
        key = _admin_key(args.key_file)
        api = AdminApi(args.url, key)
        if args.verb == "list":
            return _list(api, args)
        if args.verb == "show":
            body = api.call("GET", f"/admin/clients/{_quote(args.client)}")
            print(json.dumps(body, indent=2) if args.json else _describe(body))
            return 0
        if args.verb == "reset":
            return _reset(api, args)
        return _pin(api, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class AdminApi:
    """Calls one guard's admin API with the admin key."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._key = key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON answer of ``method path``; an error answer raises :class:`AdminError`."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{_error_message(exc)} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the guard at {self.url}: {reason}") from None


def _admin_key(key_file: Path | str | None) -> str:
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin key file: {exc}") from None
    else:
        key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise ValueError(f"no admin key: set {KEY_ENV}, or pass --key-file (or {KEY_FILE_ENV})")
    return key


def _list(api: AdminApi, args: argparse.Namespace) -> int:
    query = {name: getattr(args, name) for name in ("assessed", "limit", "offset")}
    if args.pinned:
        query["pinned"] = "true"
    rows: list[dict[str, Any]] = []
    while True:
        present = {name: value for name, value in query.items() if value is not None}
        page = api.call("GET", "/admin/clients?" + urllib.parse.urlencode(present))
        rows += page["data"]
        following = page["next_offset"]
        if not (args.all and following is not None):
            break
        query["offset"] = following
    if args.json:
        print(json.dumps({"data": rows, "total": page["total"], "next_offset": following}))
        return 0
    print(f"{'client':<24} {'tier':<12} {'risk':>6}  {'assessed':<9} {'action':<8} {'mode':<8} pin")
    for row in rows:
        risk = "-" if row["score"] is None else f"{row['score']:.3f}"
        pin = row["pin"]
        pinned = f"{pin['action']} until {pin['until_iso']}" if pin else ""
        print(
            f"{row['client']:<24} {row['tier']:<12} {risk:>6}  {row['assessed']:<9} "
            f"{row['action']:<8} {row['mode']:<8} {pinned}"
        )
    print(f"\n{len(rows)} of {page['total']} client(s)", file=sys.stderr)
    if following is not None:
        print(f"more: --offset {following} (or --all)", file=sys.stderr)
    return 0


def _reset(api: AdminApi, args: argparse.Namespace) -> int:
    path = f"/admin/clients/{_quote(args.client)}/reset"
    answer = api.call("POST", path, {"by": args.by, "note": args.note})
    if args.json:
        print(json.dumps(answer))
        return 0
    before = answer["before"]
    if before["score"] is None:
        print(f"reset {args.client} (it had no risk profile)")
    else:
        print(
            f"reset {args.client} (was risk {before['score']:.3f}, {before['assessed']}, "
            f"{before['requests']} requests)"
        )
    return 0


def _pin(api: AdminApi, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"action": args.action, "by": args.by, "note": args.note}
    if args.action != "auto":
        if args.duration is None and args.until is None:
            raise ValueError("a pin needs an expiry: --for DURATION or --until TIME")
        if args.duration is not None:
            body["expires_in_s"] = parse_duration(args.duration)
        else:
            body["until"] = args.until
    answer = api.call("PUT", f"/admin/clients/{_quote(args.client)}/pin", body)
    pin = answer["pin"]
    if args.json:
        print(json.dumps(answer))
    elif pin is None:
        print(f"{args.client}: no pin, the score decides (auto)")
    else:
        print(f"{args.client}: pinned {pin['action']} until {pin['until_iso']}")
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h`` or ``7d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h or 7d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def _describe(body: dict[str, Any]) -> str:
    lines = [
        f"client   {body['client']} (tier {body['tier']})",
        f"risk     {body['score']:.3f}: the score calls for {body['assessed']}",
        f"action   {body['action']} (detection mode {body['mode']})",
    ]
    pin = body.get("pin")
    if pin:
        by = f" by {pin['by']}" if pin["by"] else ""
        note = f": {pin['note']}" if pin["note"] else ""
        lines.append(f"pin      {pin['action']} until {pin['until_iso']}{by}{note}")
    signals = sorted(body.get("signals", {}).items(), key=lambda item: -item[1])
    if signals:
        lines.append("signals  " + ", ".join(f"{name} {value:.3f}" for name, value in signals))
    profile = body.get("profile")
    if profile:
        lines.append(
            f"profile  {profile['total']} requests, {profile['distinct_prompts']} distinct prompts"
        )
    return "\n".join(lines)


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return exc.reason


def _quote(client: str) -> str:
    return urllib.parse.quote(client, safe="")


def _whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
