"""The OpenAPI document: valid, committed as generated, and in agreement with the validator."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator
from multidict import CIMultiDict, CIMultiDictProxy
from openapi_spec_validator import validate

from guard_server.config.loader import load_settings
from guard_server.errors import GuardError
from guard_server.openai_fields import FIELDS, GUARD_ONLY, Endpoint
from guard_server.openapi import PATHS, REQUEST_SCHEMAS, openapi_document, openapi_json
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.validate import parse_json_object, validate_request
from guard_server.testing import POLICIES, REPO

COMMITTED = REPO / "docs" / "openapi.json"
SETTINGS = load_settings(POLICIES / "guard.yaml")
SCHEMA = schemathesis.openapi.from_dict(openapi_document())


def test_the_document_is_valid_openapi() -> None:
    validate(openapi_document())


def test_the_committed_document_is_what_the_command_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "guard_server", "openapi"], capture_output=True, check=True
    ).stdout
    assert printed == openapi_json()
    assert COMMITTED.read_bytes() == printed, (
        "docs/openapi.json is stale: run `guard-server openapi > docs/openapi.json`"
    )


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_every_client_field_is_documented_and_no_other(endpoint: Endpoint) -> None:
    schema = openapi_document()["components"]["schemas"][REQUEST_SCHEMAS[endpoint]]
    expected = {
        spec.name for spec in FIELDS.values() if endpoint in spec.types and spec.group != GUARD_ONLY
    }
    assert set(schema["properties"]) == expected
    assert schema["additionalProperties"] is False
    assert "vllm_xargs" not in schema["properties"]


def _validate(endpoint: Endpoint, body: object) -> GuardError | None:
    """What the guard's validator makes of ``body`` sent as JSON: None if it passes."""
    ctx = RequestContext(endpoint, SETTINGS, CIMultiDictProxy(CIMultiDict()), time.perf_counter())
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # as sent
        ctx.body = parse_json_object(raw)
        asyncio.run(validate_request(ctx))
    except GuardError as exc:
        return exc
    return None


def _body_schema(endpoint: Endpoint) -> Draft202012Validator:
    """A validator of the request body schema of ``endpoint``, as the document has it."""
    document = openapi_document()
    schema = {
        "$ref": f"#/components/schemas/{REQUEST_SCHEMAS[endpoint]}",
        "components": document["components"],
    }
    return Draft202012Validator(schema)


_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_the_validator_accepts_every_body_the_document_allows(endpoint: Endpoint) -> None:
    operation = SCHEMA[PATHS[endpoint]]["POST"]

    @_SETTINGS
    @given(operation.as_strategy(schemathesis.GenerationMode.POSITIVE))
    def check(case: schemathesis.Case) -> None:
        error = _validate(endpoint, case.body)
        assert error is None, (case.body, error and error.body())

    check()


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_the_validator_rejects_every_body_the_document_forbids(endpoint: Endpoint) -> None:
    operation = SCHEMA[PATHS[endpoint]]["POST"]

    @_SETTINGS
    @given(operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    def check(case: schemathesis.Case) -> None:
        if _body_schema(endpoint).is_valid(case.body):
            return  # the violation is elsewhere (a header): the live fuzz (test_fuzz.py) sends it
        error = _validate(endpoint, case.body)
        assert error is not None and error.status == 400, case.body

    check()
