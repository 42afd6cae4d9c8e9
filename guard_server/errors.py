"""OpenAI-shaped errors: one exception type, rendered by one middleware."""

from __future__ import annotations

from typing import Any

import orjson


class GuardError(Exception):
    """An error that reaches the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The error object as OpenAI returns it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        """The serialized error body."""
        return orjson.dumps(self.body())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GuardError:
    """A 400 ``invalid_request_error``."""
    return GuardError(400, message, param=param, code=code)


def unauthorized(message: str) -> GuardError:
    """A 401 ``authentication_error``."""
    return GuardError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> GuardError:
    """A 404 for a model that does not exist or that the caller's tier may not use."""
    return GuardError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def upstream_error(status: int, message: str, code: str) -> GuardError:
    """A 502/503/504 caused by the upstream model server."""
    return GuardError(status, message, type="upstream_error", code=code)
