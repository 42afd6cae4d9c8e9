"""What one request says about its sender: prompt identities, template, client fingerprint.

Everything here is computed from the request's canonical model input
(``guard_server.canonical``), never from its bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import orjson

from guard_server.canonical import CanonicalInput
from guard_server.openai_fields import Endpoint

_NUMBER = re.compile(r"\d+")
_ENDPOINT_NAMES = {endpoint: endpoint.value for endpoint in Endpoint}  # Enum.value is slow
_TEMPLATE_HEAD = 16  # characters of the last turn's template in the fingerprint
_NORMALIZED_CHARS = 4096
"""Characters of a turn normalized for the fingerprint: a script's scaffolding shows in a
turn's head, and the work per request stays bounded whatever the size of the body."""
# Request fields that describe *how* a client's software asks, not *what* it asks.
_STYLE_FIELDS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
    "presence_penalty", "frequency_penalty", "seed", "logit_bias",
})  # fmt: skip


@dataclass(slots=True)  # not frozen: built per request, and frozen __init__ costs 4x
class RequestFeatures:
    """The features of one request that detection keeps (no prompt text)."""

    prompt_hashes: tuple[str, ...]  # one 64-bit hex identity per prompt (see prompt_identity)
    fingerprint: str
    wants_logprobs: bool
    max_top: bool
    logit_bias: bool
    logprobs: int | None = None  # the logprob count asked for (None: none; -1: all)

    @property
    def prompts(self) -> int:
        """How many prompts the request counts as."""
        return len(self.prompt_hashes)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def template_of(text: str) -> str:
    """A prompt with its numbers and spacing normalized: requests from one script share it."""
    return " ".join(_NUMBER.sub("#", text).split()).lower()


def _template_head(text: str) -> str:
    """``template_of(text)[:16]``, normalizing only as much of a long text as it needs."""
    head = template_of(text[: 2 * _TEMPLATE_HEAD])
    if len(head) <= _TEMPLATE_HEAD and len(text) > 2 * _TEMPLATE_HEAD:
        head = template_of(text[:_NORMALIZED_CHARS])  # digits or spaces collapsed it
    return head[:_TEMPLATE_HEAD]


class ScaffoldLines:
    """The normalized form of earlier turns (system prompts and few-shot turns repeat), as
    8-byte digests keyed by a hash of the turn (Python's keyed 64-bit string hash): every
    entry has the same small size, so the cache is bounded in bytes (about 200 bytes an
    entry) whatever the texts. A turn is normalized on its first ``_NORMALIZED_CHARS``
    characters."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._lines: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lines)

    def digest(self, role: str, text: str) -> str:
        """The digest of ``role: template_of(text)``."""
        key = hash((role, text))
        line = self._lines.get(key)
        if line is None:
            template = template_of(text[:_NORMALIZED_CHARS])
            line = self._lines[key] = _digest(f"{role}:{template}".encode())
            if len(self._lines) > self.max_entries:
                self._lines.popitem(last=False)
        else:
            self._lines.move_to_end(key)
        return line


SCAFFOLD_LINES = ScaffoldLines()
_SCAFFOLD_ROLES = frozenset({"system", "developer"})


def chat_prompt_identity(turns: tuple[tuple[str, str], ...]) -> str:
    """What detection counts as one chat prompt: the newest user turn (and any turn after
    it) with the system-prompt scaffold (system and developer turns), without the rest of
    the conversation. Each turn of one chat is then a new prompt only if its question is,
    and re-asking a question in another chat is a repeat."""
    newest = len(turns) - 1
    while newest > 0 and turns[newest][0] != "user":
        newest -= 1
    kept = [turn for turn in turns[:newest] if turn[0] in _SCAFFOLD_ROLES]
    if len(kept) == newest:  # nothing left out (a system prompt and a question): dump as is
        return _digest(orjson.dumps(turns))
    return _digest(orjson.dumps([*kept, *turns[newest:]]))


def extract_features(canonical: CanonicalInput, max_top: int) -> RequestFeatures:
    """Features of a request's canonical input (before the guard rewrites it). ``max_top``
    is the tier's logprob cap: asking for that many counts as asking for the most."""
    endpoint = canonical.endpoint
    chat = endpoint is Endpoint.CHAT
    if chat:
        turns = canonical.turns
        last = turns[-1][1]
        digest = SCAFFOLD_LINES.digest
        scaffold = [digest(role, text) for role, text in turns[:-1]]
    else:
        scaffold, last = [], canonical.prompt_texts[0]
    sampling = canonical.sampling
    # in the request's order: the dump sorts the keys
    style = {name: value for name, value in sampling.items() if name in _STYLE_FIELDS}
    if "logit_bias" in style:
        style["logit_bias"] = len(style["logit_bias"])
    count = canonical.logprobs
    if count is not None:
        style["logprobs"] = count
    signature = orjson.dumps(
        [_ENDPOINT_NAMES[endpoint], scaffold, _template_head(last), style],
        option=orjson.OPT_SORT_KEYS,
    )
    wants = count is not None
    if chat:
        prompt_hashes: tuple[str, ...] = (chat_prompt_identity(turns),)
    else:
        prompt_hashes = tuple(identity[:8].hex() for identity in canonical.identities)
    return RequestFeatures(  # positional: keywords cost a dataclass __init__ twice as much
        prompt_hashes,  # prompt_hashes
        _digest(signature),  # fingerprint
        wants,  # wants_logprobs
        wants and (count == -1 or count >= max_top),  # max_top
        bool(sampling.get("logit_bias")),  # logit_bias
        count,  # logprobs
    )
