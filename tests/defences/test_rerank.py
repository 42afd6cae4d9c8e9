"""A perturbed client's logprobs keep their shape: as many values, still sorted, the first
``ranked`` in their true order and the rest in a keyed one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guard_server.defences.logprobs import LogprobHardening

KEY = b"k" * 32

positions = st.lists(
    st.floats(min_value=-30, max_value=0, allow_nan=False), min_size=1, max_size=21, unique=True
)


@given(values=positions, ranked=st.integers(min_value=0, max_value=5))
def test_rerank_keeps_the_values_and_the_head_and_is_repeatable(
    values: list[float], ranked: int
) -> None:
    hardening = LogprobHardening(ranked=ranked)
    tokens = [f"t{i}" for i in range(len(values))]
    out, order = hardening.rerank(KEY, 3, tokens, values)
    assert sorted(out) == sorted(values)  # the same values, given to other tokens
    assert sorted(order) == list(range(len(values)))
    assert [out[i] for i in order] == sorted(values, reverse=True)  # listed in value order
    by_rank = sorted(range(len(values)), key=lambda i: -values[i])
    assert order[:ranked] == by_rank[:ranked]  # the head keeps its rank and its value
    assert all(out[i] == values[i] for i in by_rank[:ranked])
    assert hardening.rerank(KEY, 3, tokens, values) == (out, order)


@given(values=positions)
def test_a_pinned_token_keeps_its_value_and_stays_last(values: list[float]) -> None:
    tokens = [f"t{i}" for i in range(len(values))]
    pinned = min(range(len(values)), key=lambda i: values[i])
    out, order = LogprobHardening(ranked=1).rerank(KEY, 0, tokens, values, pinned)
    assert out[pinned] == values[pinned] and order[-1] == pinned


def test_the_tail_order_depends_on_the_key_and_position() -> None:
    values = [-0.1 * i for i in range(20)]
    tokens = [f"t{i}" for i in range(20)]
    hardening = LogprobHardening(ranked=1)
    orders = {
        tuple(hardening.rerank(key, position, tokens, values)[1])
        for key in (b"a" * 32, b"b" * 32)
        for position in (0, 1)
    }
    assert len(orders) == 4
