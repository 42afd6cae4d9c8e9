"""``guard-server trace``: which client's watermark explains a set of generations?

Every configured client's watermark key is re-derived from the server secret, the text is
tokenized with the served model's tokenizer, and each key gets a KGW z-test over the
de-duplicated (previous token, token) pairs. A client is named only if its p-value, after a
Bonferroni correction over all the clients tested, is below ``alpha``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from guard_server.config.loader import Settings
from guard_server.defences.keys import watermark_key
from guard_server.defences.watermark import WatermarkScore, score


class TraceInputError(Exception):
    """The generations file cannot be used."""


@dataclass(frozen=True, slots=True)
class ClientScore:
    """One client's watermark test."""

    client: str
    score: WatermarkScore


@dataclass(frozen=True, slots=True)
class Verdict:
    """Every client's test, and the client named (or None)."""

    scores: list[ClientScore]
    named: str | None
    alpha: float


def read_generations(path: Path) -> list[str]:
    """Texts from a JSON-lines file: one object per line with a ``text`` (or ``completion``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceInputError(f"{path}: cannot read: {exc}") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceInputError(f"{path}:{number}: not JSON: {exc.msg}") from None
        text = record.get("text", record.get("completion")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TraceInputError(
                f'{path}:{number}: expected an object with a string "text" (or "completion")'
            )
        texts.append(text)
    if not texts:
        raise TraceInputError(f"{path}: no generations found")
    return texts


def tokenize(texts: list[str], tokenizer_dir: Path) -> list[list[int]]:
    """Token ids of each text under the served model's tokenizer (``tokenizer.json``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TraceInputError(
            "trace needs the `tokenizers` package (pip install tokenizers)"
        ) from None
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise TraceInputError(f"{tokenizer_dir}: no tokenizer.json there")
    tokenizer = Tokenizer.from_file(str(path))
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def require_secret(settings: Settings) -> None:
    """Keys are derived from the server secret: without the configured one nothing matches."""
    if settings.secret_is_ephemeral:
        raise TraceInputError("trace needs the server secret the guard serves with (`secret:`)")


def trace(settings: Settings, sequences: list[list[int]], gamma: float, alpha: float) -> Verdict:
    """Test every configured client's key; name the one that explains the text, if any."""
    require_secret(settings)
    clients = sorted(settings.clients_by_id)
    scores = [
        ClientScore(client, score(sequences, watermark_key(settings.secret, client), gamma))
        for client in clients
    ]
    scores.sort(key=lambda item: item.score.p_value)
    best = scores[0] if scores else None
    named = None
    if best is not None and best.score.p_value * len(scores) < alpha:
        named = best.client
    return Verdict(scores, named, alpha)
