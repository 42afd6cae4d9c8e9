"""Admit: the plan's block, then the plan's rate limits (requests/min, tokens/min,
concurrency), shared by replicas.

Tokens are reserved at admission from an estimate and settled against the real usage at
completion, streams included. The estimate counts the request's ``max_tokens`` in full,
except one the guard filled in (the client set none) for a client whose limits are not
tightened: that counts as at most ``_DEFAULTED_RESERVATION`` per choice, and a longer answer
is charged at settlement. Settlement runs as its own task, off the answer's path, so a
cancelled request (client disconnect) still releases its concurrency slot; a slot also
expires by itself. At most ``SETTLING`` settlements talk to the store at once; a failed one is
counted (``guard_state_errors_total``) and logged.

With a speculative store the score stage has already taken the admission, under the limits
the plan was expected to have (``ctx.speculation``): this stage keeps it when the plan agrees,
which is the common case, and otherwise corrects it in one atomic call (``readmit``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque

from guard_server.canonical import prompt_list
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.state.base import (
    Admission,
    AdmitRequest,
    LimitSpec,
    SpeculativeStore,
    StateStore,
    StateUnavailable,
)

log = logging.getLogger(__name__)

_CHARS_PER_TOKEN = 4
_DEFAULT_COMPLETION = {
    Endpoint.CHAT: 256,
    Endpoint.COMPLETIONS: 16,
    Endpoint.EMBEDDINGS: 0,
    Endpoint.RESPONSES: 256,
}
_DEFAULTED_RESERVATION = _DEFAULT_COMPLETION[Endpoint.CHAT]
"""Completion tokens reserved per choice for a ``max_tokens`` the guard filled in."""
SETTLING = 64
"""Settlements in flight to the store at once (the rest wait their turn, off the answer's
path)."""
_RELEASE_RETRY_S = 1.0
"""How often slots left behind by a state outage are released again."""
_MAX_LEFT_BEHIND = 10_000
"""Slots kept for release after an outage; older ones expire by themselves."""


def estimate_tokens(ctx: RequestContext) -> int:
    """A cheap upper-ish estimate of a request's tokens: its prompt tokens (text by
    characters, token-id prompts exactly) plus prompts × n × max_tokens."""
    return _prompt_estimate(ctx) + _choices(ctx) * _max_completion(ctx)


def reservation(ctx: RequestContext) -> int:
    """What admission reserves: :func:`estimate_tokens`, but a ``max_tokens`` the guard
    filled in counts as at most ``_DEFAULTED_RESERVATION`` per choice unless the plan
    tightened the client's limits. (A short answer then costs a client its own size, not the
    tier's whole bound; settlement charges a long one in full.)"""
    assert ctx.plan is not None
    return _reservation(ctx, tightened=ctx.plan.limits != ctx.plan.advertised)


def _reservation(ctx: RequestContext, tightened: bool) -> int:
    completion = _max_completion(ctx)
    defaulted = ("defaulted", "max_tokens") in ctx.policy_actions or (
        "defaulted",
        "max_output_tokens",
    ) in ctx.policy_actions
    if defaulted and not tightened:
        completion = min(completion, _DEFAULTED_RESERVATION)
    return _prompt_estimate(ctx) + _choices(ctx) * completion


def _prompt_estimate(ctx: RequestContext) -> int:
    canonical = ctx.canonical
    assert canonical is not None
    if ctx.endpoint.conversational:
        return sum(len(text) for _, text in canonical.turns) // _CHARS_PER_TOKEN + 1
    field = "input" if ctx.endpoint is Endpoint.EMBEDDINGS else "prompt"
    return sum(_prompt_tokens(prompt) for prompt in prompt_list(ctx.body[field]))


def _choices(ctx: RequestContext) -> int:
    assert ctx.canonical is not None
    return ctx.canonical.prompts * ctx.canonical.n


def _max_completion(ctx: RequestContext) -> int:
    body = ctx.body
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    return limit or body.get("max_output_tokens") or _DEFAULT_COMPLETION[ctx.endpoint]


def _prompt_tokens(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else len(prompt) // _CHARS_PER_TOKEN + 1


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m30s``, ``2.5s``, ``120ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"


def ratelimit_headers(
    advertised: LimitSpec, applied: LimitSpec, admission: Admission
) -> dict[str, str]:
    """``x-ratelimit-*`` headers like OpenAI's, the same for a flagged client as for any.

    While a tightened limit (``applied``) is enforced, the headers show the client's
    configured one (``advertised``) and the level of the store's bucket at that rate
    (``Admission.shown_*``): it falls by one request, and by the tokens used, and refills,
    exactly as an unflagged client's bucket does, and it starts and ends where the enforced
    bucket was, so nothing jumps. Only a refusal shows the enforced bucket's level (near 0),
    as any 429 does: that the 429 comes early is the one thing no header can hide.
    """
    headers: dict[str, str] = {}
    for kind, limit, enforced, shown, remaining in (
        ("requests", advertised.requests_per_minute, applied.requests_per_minute,
         admission.shown_requests, admission.remaining_requests),
        ("tokens", advertised.tokens_per_minute, applied.tokens_per_minute,
         admission.shown_tokens, admission.remaining_tokens),
    ):  # fmt: skip
        if limit is None or enforced is None or remaining is None:
            continue
        level = remaining if shown is None or admission.exceeded == kind else shown
        level = min(max(level, 0.0), float(limit))
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(level))
        headers[f"x-ratelimit-reset-{kind}"] = _duration((limit - level) * 60 / limit)
    return headers


def _shown(advertised: LimitSpec, applied: LimitSpec) -> LimitSpec | None:
    """The limits the headers show when they differ from the enforced ones (tightened)."""
    return None if advertised == applied else advertised


class Admitter:
    """The admission stage, holding the state store."""

    def __init__(
        self, store: StateStore, metrics: GuardMetrics, fail_open: bool, slot_ttl_s: float
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.fail_open = fail_open
        self.slot_ttl_s = slot_ttl_s
        self._settling: set[asyncio.Task[None]] = set()
        self._settle_slots = asyncio.Semaphore(SETTLING)
        # (scope, limits, slot, when): slots a failed store call may have left taken
        self._left_behind: deque[tuple[str, LimitSpec, str, float]] = deque(maxlen=_MAX_LEFT_BEHIND)
        self._releasing: asyncio.Task[None] | None = None

    def request_for(self, ctx: RequestContext, limits: LimitSpec | None) -> AdmitRequest | None:
        """The admission a request needs under ``limits`` (None: blocked, or unlimited). For
        one request, all of it but the slot id follows from ``limits``."""
        assert ctx.client is not None and ctx.canonical is not None
        if limits is None or limits.unlimited:
            return None
        advertised = ctx.client.limits
        return AdmitRequest(
            f"c:{ctx.client.id}",
            limits,
            _reservation(ctx, tightened=limits != advertised),
            uuid.uuid4().hex,
            self.slot_ttl_s,
            ctx.canonical.prompts,
            _shown(advertised, limits),
        )

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.client is not None and ctx.plan is not None
        admission: Admission | None = None
        if ctx.lost_speculation is not None:  # its observe-and-admit call failed: it may run
            lost = ctx.lost_speculation
            self._release_later(lost.scope, lost.spec, lost.slot)
        scope, slot = ctx.plan.limit_scope, uuid.uuid4().hex
        try:
            if ctx.speculation is not None:
                admission = await self._confirm(ctx, ctx.speculation)
            if ctx.plan.action == "block":
                whom = (
                    "Requests for this end user are" if ctx.plan.by_end_user else "This API key is"
                )
                raise GuardError(
                    403,
                    f"{whom} suspended. Contact the API operator.",
                    type="permission_error",
                    code="access_suspended",
                )
            limits = ctx.plan.limits
            if limits.unlimited:
                return
            assert ctx.canonical is not None
            ctx.token_ceiling = estimate_tokens(ctx)
            if admission is None:
                admission = await self.store.admit(
                    scope,
                    limits,
                    reservation(ctx),
                    slot,
                    self.slot_ttl_s,
                    requests=ctx.canonical.prompts,
                    shown=_shown(ctx.plan.advertised, limits),
                )
        except StateUnavailable as exc:
            self._state_failed(exc)
            # A call that timed out may still run: a paused Redis runs what it was sent
            # when it resumes, taking a slot that no settlement would release.
            if not ctx.plan.limits.unlimited:
                self._release_later(scope, ctx.plan.limits, slot)
            if self.fail_open:
                return
            raise GuardError(
                503,
                "Rate limiting is unavailable right now; try again shortly.",
                type="server_error",
                code="state_unavailable",
            ) from None
        self.metrics.state_up.set(1)
        ctx.admission = admission
        headers = ratelimit_headers(ctx.plan.advertised, limits, admission)
        ctx.response_headers.update(headers)
        if admission.allowed:
            return
        self.metrics.rate_limited.labels(ctx.client.tier.name, admission.exceeded).inc()
        retry = max(1, math.ceil(admission.retry_after_s))
        raise GuardError(
            429,
            f"Rate limit reached for {admission.exceeded} "
            f"(client `{ctx.client.id}`). Please try again in {retry}s.",
            type=admission.exceeded or "requests",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(retry)},
        )

    async def _confirm(
        self, ctx: RequestContext, speculation: tuple[AdmitRequest | None, Admission | None]
    ) -> Admission | None:
        """The speculative admission if the plan needs that one, else what correcting it
        gives; None when nothing is decided yet (the plan's admission is still to take)."""
        plan = ctx.plan
        assert plan is not None
        taken, admission = speculation
        # For one request, the limits decide the rest of an admission (see request_for).
        limits = None if plan.action == "block" or plan.limits.unlimited else plan.limits
        if limits == (taken.spec if taken is not None else None):
            return admission
        needed = self.request_for(ctx, limits)
        if taken is not None and admission is not None and admission.allowed:
            store = self.store
            assert isinstance(store, SpeculativeStore)
            self.metrics.admissions_corrected.inc()
            return await store.readmit(taken, needed)
        return None

    def settle(self, ctx: RequestContext) -> None:
        """Release the slot and settle tokens, in a task of its own (survives cancellation)."""
        admission = ctx.admission
        if ctx.client is None or ctx.plan is None or admission is None or not admission.allowed:
            return
        limits = ctx.plan.limits
        if ctx.prompt_tokens or ctx.completion_tokens:
            refund = admission.reserved_tokens - ctx.prompt_tokens - ctx.completion_tokens
        elif ctx.status != 200:
            refund = admission.reserved_tokens  # nothing was generated
        else:
            # usage unknown (a stream cut short): charge all it may have used
            refund = admission.reserved_tokens - ctx.token_ceiling
        task = asyncio.get_running_loop().create_task(
            self._settle(
                ctx.plan.limit_scope,
                limits,
                admission.slot,
                refund,
                _shown(ctx.plan.advertised, limits),
            )
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, scope: str, limits: LimitSpec, slot: str, refund: int, shown: LimitSpec | None
    ) -> None:
        try:
            async with self._settle_slots:
                await self.store.settle(scope, limits, slot, refund, shown)
        except StateUnavailable as exc:
            self._state_failed(exc)
            self._release_later(scope, limits, slot)
        except Exception:  # never lost silently: counted and logged with its traceback
            self.metrics.state_errors.inc()
            log.exception("settling %s failed", scope)

    async def drain(self) -> None:
        """Wait for the settlements still in flight (at shutdown, before the store closes)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _release_later(self, scope: str, limits: LimitSpec, slot: str) -> None:
        """Release ``slot`` once the store answers again (a slot also expires by itself, but
        only after the longest request: until then the client would be refused for it)."""
        if not (slot and limits.concurrent_requests):
            return
        self._left_behind.append((scope, limits, slot, time.monotonic()))
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.get_running_loop().create_task(self._release_left_behind())

    async def _release_left_behind(self) -> None:
        """Release the slots left behind, oldest first, until none is left. Only the slot:
        a refund that may already have been applied must not be applied twice."""
        while self._left_behind:
            await asyncio.sleep(_RELEASE_RETRY_S)
            expired = time.monotonic() - self.slot_ttl_s
            while self._left_behind:
                scope, limits, slot, since = self._left_behind[0]
                if since > expired:
                    try:
                        await self.store.settle(scope, limits, slot, 0)
                    except StateUnavailable:
                        break  # still down: the next round
                self._left_behind.popleft()

    def _state_failed(self, exc: Exception) -> None:
        self.metrics.state_up.set(0)
        self.metrics.state_errors.inc()
        log.warning(
            "state backend unavailable (failing %s): %s",
            "open" if self.fail_open else "closed",
            exc,
        )
