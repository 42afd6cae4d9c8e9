"""The ``guard-server`` command line: serve, check-config, trace, hash-key, clients, replay,
openapi."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

from guard_server import admin_cli, replay
from guard_server.config.loader import ConfigError, Settings, load_settings
from guard_server.logs import configure_logging
from guard_server.pipeline.auth import hash_key
from guard_server.upstream.bundled_teacher import MODELS
from guard_server.upstream.smollm2 import ModelUnavailable

DEFAULT_CONFIG = Path("policies/guard.yaml")
DEMO_KEY = "sk-guard-demo"

log = logging.getLogger("guard_server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the guard")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    serve.add_argument(
        "--teacher",
        choices=("arithmetic", "smollm2"),
        help="the managed model to serve when no upstream is configured "
        "(overrides bundled_teacher.model; smollm2 needs scripts/install-smollm2.sh)",
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="overrides logging.level (default INFO)",
    )
    serve.add_argument(
        "--log-format", choices=["text", "json"], help="overrides logging.format (default text)"
    )
    check = commands.add_parser("check-config", help="validate a config and its policy files")
    check.add_argument("file", type=Path)
    trace = commands.add_parser(
        "trace", help="name the client whose watermark explains a file of generations"
    )
    trace.add_argument("file", type=Path, help='JSON lines, each {"text": "..."}')
    trace.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    trace.add_argument(
        "--tokenizer", type=Path, help="the served model's folder (default: the bundled teacher)"
    )
    trace.add_argument("--gamma", type=float, default=0.25, help="the green fraction used")
    trace.add_argument("--alpha", type=float, default=1e-6, help="family-wise significance")
    trace.add_argument("--json", action="store_true", help="print the result as JSON")
    key = commands.add_parser("hash-key", help="make a new API key (or hash one from stdin)")
    key.add_argument("--stdin", action="store_true", help="hash the key read from stdin")
    admin_cli.add_parser(commands)
    replay.add_parser(commands)
    commands.add_parser("openapi", help="print the OpenAPI document of the public API")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "hash-key":
        return _hash_key(args.stdin)
    if args.command == "trace":
        return _trace(args)
    if args.command == "clients":
        return admin_cli.run(args)
    if args.command == "replay":
        return replay.run(args)
    if args.command == "openapi":
        from guard_server.openapi import openapi_json

        sys.stdout.buffer.write(openapi_json())
        return 0
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs = settings.config.logging
    configure_logging(args.log_level or logs.level, args.log_format or logs.format)
    if args.workers is not None:
        server = settings.config.server.model_copy(update={"workers": args.workers})
        config = settings.config.model_copy(update={"server": server})
        settings = dataclasses.replace(settings, config=config)
    if args.teacher is not None:
        if settings.config.upstreams:
            print(
                f"error: {args.config} configures upstreams; --teacher picks the model that "
                "serve runs itself when there are none",
                file=sys.stderr,
            )
            return 2
        settings = _with_teacher(settings, args.teacher)
    if settings.config.server.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Must be set before prometheus-client is first imported (by the runner).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="guard-metrics-")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    from guard_server.runner import serve

    server = settings.config.server
    try:
        with contextlib.suppress(KeyboardInterrupt):
            serve(
                settings,
                args.host or server.host,
                server.port if args.port is None else args.port,
                lambda base_url: _print_banner(base_url, settings),
            )
    except (ConfigError, ModelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _with_teacher(settings: Settings, model: str) -> Settings:
    """``settings`` with ``bundled_teacher.model`` replaced (``serve --teacher``)."""
    teacher = settings.config.bundled_teacher.model_copy(update={"model": model})
    config = settings.config.model_copy(update={"bundled_teacher": teacher})
    return dataclasses.replace(settings, config=config)


def _check_config(path: Path) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"ok: {path}: {len(settings.model_names)} model(s), {len(settings.tiers)} tier(s), "
        f"{len(settings.clients_by_key_hash)} client key(s), "
        f"{len(settings.files) - 1} policy file(s)"
    )
    return 0


def _trace(args: argparse.Namespace) -> int:
    from guard_server.trace import (
        TraceInputError,
        read_generations,
        require_secret,
        tokenize,
        trace,
    )
    from guard_server.upstream.bundled_teacher import TEACHER_DIR

    if not 0 < args.gamma < 1 or not 0 < args.alpha < 1:
        print("error: --gamma and --alpha must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
        require_secret(settings)
        sequences = tokenize(read_generations(args.file), args.tokenizer or TEACHER_DIR)
        verdict = trace(settings, sequences, args.gamma, args.alpha)
    except (ConfigError, TraceInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "named": verdict.named,
                    "alpha": verdict.alpha,
                    "clients": [
                        {"client": item.client, **dataclasses.asdict(item.score)}
                        for item in verdict.scores
                    ],
                }
            )
        )
        return 0
    print(f"{'client':<24} {'z':>8} {'p-value':>10} {'scored':>7}")
    for item in verdict.scores:
        result = item.score
        print(f"{item.client:<24} {result.z:>8.2f} {result.p_value:>10.2e} {result.scored:>7}")
    tested = len(verdict.scores)
    if verdict.named:
        print(f"\nattributed to: {verdict.named} (p × {tested} clients < {verdict.alpha:g})")
    else:
        print(f"\nattributed to: nobody (no p × {tested} clients below {verdict.alpha:g})")
    return 0


def _hash_key(from_stdin: bool) -> int:
    if from_stdin:
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    key = "sk-" + secrets.token_urlsafe(32)
    print(f"key:  {key}\nhash: {hash_key(key)}")
    print("Give the key to the client; put only the hash in a policy file.", file=sys.stderr)
    return 0


def _print_banner(base_url: str, settings: Settings) -> None:
    # stdout may carry the audit log's JSON lines: the banner then goes to stderr
    out = sys.stderr if settings.config.audit.path == "-" else sys.stdout
    model = settings.public_models[0]
    question = "What is 12 + 7?"
    teacher = settings.config.bundled_teacher
    if not settings.config.upstreams and teacher.model == "arithmetic":
        from guard_server.teacher.task import make_problems

        question = make_problems(1, seed=7, split="heldout")[0].question
    elif not settings.config.upstreams:
        question = MODELS[teacher.model].sample_question
    print(
        f"""
guard-server is listening on {base_url}  (model: {model})

Try it with the openai SDK (the demo key works only with policies/demo-clients.yaml):

    from openai import OpenAI
    client = OpenAI(base_url="{base_url}", api_key="{DEMO_KEY}")
    reply = client.chat.completions.create(
        model="{model}", messages=[{{"role": "user", "content": {question!r}}}], temperature=0)
    print(reply.choices[0].message.content)

or with curl:

    curl -s {base_url}/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\
      -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "{question}"}}]}}'
""",
        file=out,
        flush=True,
    )
