"""Issue 16, item 3: constrained decoding renormalises the returned logprobs over a token set
the client picks (`structured_outputs: {"regex": "[AZ]"}` with `top_logprobs: 5` gave `A` and
`Z` only, and a dominant one came back exact: a chosen logit difference).

Now logprobs with any constraint are refused on the default tier before vLLM sees them; a
tier that opts in (`logprobs.with_constraints: allow`) gets them hardened, never exact.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from guard_server.teacher.task import make_problems
from guard_server.testing import TRUSTED_KEY, GuardProcess
from tests.redteam.conftest import post, upstream_calls

QUESTION = make_problems(1, seed=51, split="heldout")[0].question
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
REGEX = {"structured_outputs": {"regex": "[AZ]"}}
CONSTRAINTS: list[tuple[str, dict[str, Any]]] = [
    ("structured_outputs", REGEX),
    ("structured_outputs", {"structured_outputs": {"choice": ["A", "Z"]}}),
    ("structured_outputs", {"structured_outputs": {"grammar": 'root ::= "A" | "Z"'}}),
    ("structured_outputs", {"structured_outputs": {"json": {"type": "integer"}}}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    (
        "response_format",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    ),
    ("tool_choice", {"tools": [TOOL], "tool_choice": "required"}),
    (
        "tool_choice",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "add"}}},
    ),
]


def _chat(client: str, guard: GuardProcess, **fields: Any) -> Any:
    body = {
        "model": "teacher",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 1,
        "temperature": 0,
        **fields,
    }
    return post(guard, client, "/chat/completions", body)


@pytest.mark.parametrize(("param", "constraint"), CONSTRAINTS)
def test_logprobs_under_a_constraint_are_refused_on_the_default_tier(
    rt_guard: GuardProcess, param: str, constraint: dict[str, Any]
) -> None:
    before = upstream_calls(rt_guard)
    response = _chat("rt-quiet", rt_guard, logprobs=True, top_logprobs=5, **constraint)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "parameter_not_allowed"
    assert upstream_calls(rt_guard) == before


def test_the_regex_constraint_alone_still_works(rt_guard: GuardProcess) -> None:
    response = _chat("rt-quiet", rt_guard, **REGEX)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in ("A", "Z")


def test_an_opted_in_tier_gets_no_exact_value_under_a_constraint(rt_guard: GuardProcess) -> None:
    fields = {"logprobs": True, "top_logprobs": 5, **REGEX}
    raw = _chat(TRUSTED_KEY, rt_guard, **fields).json()["choices"][0]["logprobs"]["content"][0]
    finite = [top for top in raw["top_logprobs"] if top["logprob"] > -9999]
    assert {top["token"] for top in finite} <= {"A", "Z"}  # renormalised over A and Z
    response = _chat("rt-allow", rt_guard, **fields)
    assert response.status_code == 200, response.text
    item = response.json()["choices"][0]["logprobs"]["content"][0]
    assert item["token"] == raw["token"]
    # exact_sampled_above would return a dominant sampled value as it is; not here.
    assert item["logprob"] != raw["logprob"]
    assert math.isclose(item["logprob"] * 2, round(item["logprob"] * 2))  # the 0.5 grid
