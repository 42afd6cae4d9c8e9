"""What admission reserves of a tokens-per-minute limit. A chat request that sets no
``max_tokens`` gets the tier's (8192 on the default tier) filled in; reserving all of it would
refuse an honest client's short requests long before it used its budget. Such a request
reserves a bounded estimate and settles against what it really used."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.admit import Admitter, estimate_tokens
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.context import RequestContext
from guard_server.state.base import LimitSpec
from guard_server.state.memory import MemoryStore
from tests.pipeline.helpers import context, planned_for_client

LIMITS = LimitSpec(tokens_per_minute=10_000)
QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]
USED = (20, 30)  # prompt and completion tokens of each answer


class _Clock:
    """A store clock that stands still: nothing refills while the test runs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _admitted(
    body: dict,
    limits: LimitSpec = LIMITS,
    tighten_to: LimitSpec | None = None,
    endpoint: Endpoint = Endpoint.CHAT,
) -> RequestContext:
    """``body`` through the stages up to the plan, for a client with ``limits`` (and a plan
    tightened to ``tighten_to``), on a model with a long context."""
    ctx = context(body, endpoint=endpoint)
    await authenticate(ctx)
    assert ctx.client is not None
    ctx.client = dataclasses.replace(ctx.client, limits=limits)
    ctx.max_model_len = 32_768
    await planned_for_client(ctx)
    assert ctx.plan is not None
    if tighten_to is not None:
        ctx.plan = dataclasses.replace(ctx.plan, limits=tighten_to)
    return ctx


async def _serve(admitter: Admitter, ctx: RequestContext, used: tuple[int, int] = USED) -> None:
    """Admit ``ctx``, answer it with ``used`` tokens, and settle."""
    await admitter(ctx)
    ctx.status = 200
    ctx.prompt_tokens, ctx.completion_tokens = used
    admitter.settle(ctx)
    await asyncio.sleep(0.01)  # settlement runs as a task of its own


def _admitter(store: MemoryStore) -> Admitter:
    return Admitter(store, GuardMetrics(CollectorRegistry()), fail_open=False, slot_ttl_s=60)


async def test_short_requests_without_max_tokens_stay_within_an_honest_budget() -> None:
    store = MemoryStore(clock=_Clock())
    admitter = _admitter(store)
    # Concurrent: ten short chats in flight at once use 500 of 10,000 tokens; reserving the
    # filled-in 8192 for each refused the second one.
    flight = [await _admitted({"model": "teacher", "messages": QUESTION}) for _ in range(10)]
    for ctx in flight:
        assert ctx.body["max_tokens"] == 8192
        await admitter(ctx)
        assert ctx.admission is not None and ctx.admission.allowed
    for ctx in flight:
        ctx.status = 200
        ctx.prompt_tokens, ctx.completion_tokens = USED
        admitter.settle(ctx)
    await asyncio.sleep(0.01)
    # what the bucket holds is what was used, not what was reserved
    after = await _admitted({"model": "teacher", "messages": QUESTION})
    await admitter(after)
    assert after.admission is not None
    spent = LIMITS.tokens_per_minute - after.admission.remaining_tokens  # type: ignore[operator]
    assert spent == 10 * sum(USED) + after.admission.reserved_tokens


async def test_a_long_answer_is_charged_in_full_at_settlement() -> None:
    store = MemoryStore(clock=_Clock())
    admitter = _admitter(store)
    long = await _admitted({"model": "teacher", "messages": QUESTION})
    await _serve(admitter, long, used=(20, 9000))
    assert long.admission is not None and long.admission.reserved_tokens < 1000
    # 9,020 of 10,000 spent: a short request still fits, one that may use 2,000 waits
    short = await _admitted({"model": "teacher", "messages": QUESTION})
    await admitter(short)
    assert short.admission is not None
    assert short.admission.remaining_tokens == 10_000 - 9_020 - short.admission.reserved_tokens
    larger = await _admitted({"model": "teacher", "messages": QUESTION, "max_tokens": 2000})
    with pytest.raises(GuardError) as caught:
        await admitter(larger)
    assert caught.value.status == 429


async def test_an_answer_whose_usage_never_arrived_is_charged_the_whole_bound() -> None:
    store = MemoryStore(clock=_Clock())
    admitter = _admitter(store)
    cut = await _admitted({"model": "teacher", "messages": QUESTION, "stream": True})
    await _serve(admitter, cut, used=(0, 0))  # the upstream broke off before its usage chunk
    probe = await _admitted({"model": "teacher", "messages": QUESTION})
    await admitter(probe)
    assert probe.admission is not None and probe.admission.remaining_tokens is not None
    # the whole defaulted bound was charged, as when the client set max_tokens itself
    charged = LIMITS.tokens_per_minute - probe.admission.remaining_tokens
    assert charged == estimate_tokens(cut) + probe.admission.reserved_tokens


async def test_an_explicit_max_tokens_and_a_tightened_client_reserve_it_all() -> None:
    store = MemoryStore(clock=_Clock())
    admitter = _admitter(store)
    explicit = await _admitted({"model": "teacher", "messages": QUESTION, "max_tokens": 4000})
    await admitter(explicit)
    assert explicit.admission is not None
    assert explicit.admission.reserved_tokens == estimate_tokens(explicit) >= 4000
    # a client whose limits detection tightened gets no benefit of the doubt
    tight = LimitSpec(tokens_per_minute=2_500)
    flagged = await _admitted({"model": "teacher", "messages": QUESTION}, tighten_to=tight)
    await _admitter(MemoryStore(clock=_Clock()))(flagged)
    assert flagged.admission is not None
    assert flagged.admission.reserved_tokens == estimate_tokens(flagged) > 8192


async def test_responses_reserve_and_settle_like_chat() -> None:
    store = MemoryStore(clock=_Clock())
    admitter = _admitter(store)
    chat = await _admitted({"model": "teacher", "messages": QUESTION})
    responses = await _admitted(
        {"model": "teacher", "input": QUESTION[0]["content"]}, endpoint=Endpoint.RESPONSES
    )
    assert responses.body["max_output_tokens"] == 8192
    await admitter(responses)
    await _admitter(MemoryStore(clock=_Clock()))(chat)
    assert responses.admission is not None and chat.admission is not None
    # the same conversation, the same filled-in limit: the same bounded reservation
    assert responses.admission.reserved_tokens == chat.admission.reserved_tokens < 1000
    responses.status = 200
    responses.prompt_tokens, responses.completion_tokens = USED
    admitter.settle(responses)
    await asyncio.sleep(0.01)
    explicit = await _admitted(
        {"model": "teacher", "input": "hi", "max_output_tokens": 4000}, endpoint=Endpoint.RESPONSES
    )
    await admitter(explicit)
    assert explicit.admission is not None and explicit.admission.remaining_tokens is not None
    assert explicit.admission.reserved_tokens == estimate_tokens(explicit) >= 4000
    spent = LIMITS.tokens_per_minute - explicit.admission.remaining_tokens
    assert spent == sum(USED) + explicit.admission.reserved_tokens  # settled to what was used
