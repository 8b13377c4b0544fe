"""Typed errors of the operator API.

Domain code raises these (`raise NotFound(f"no host named {name!r}")`) and
knows nothing of frames; only the edge (`Registry.dispatch`, fleetd's
/login loop) turns one into a wire error `{"id", "error": {"code",
"message"}}` with `frame()`. Each class carries its wire code:

    Invalid        bad_request      the request is malformed or a value is refused
    Unauthorized   unauthorized     no valid credentials
    Forbidden      forbidden        the caller's role does not allow it
    NotFound       not_found        the named thing does not exist
    Conflict       conflict         the current state does not allow it
    RateLimited    rate_limited     too many attempts; wait
    Unavailable    unavailable      fleetd is shutting down; try again
    UnknownMethod  unknown_method   no such method
    Internal       internal         fleetd failed; see its log
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...common import protocol


class ApiError(Exception):
    """An error reply: a wire code and a one-line message for the operator."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def frame(self, request_id: Any) -> str:
        """The wire error frame answering request `request_id`."""
        return protocol.request_error_frame(request_id, self.code, self.message)


class _Coded(ApiError):
    """An ApiError whose code is fixed by its class."""

    CODE: ClassVar[str]

    def __init__(self, message: str) -> None:
        super().__init__(self.CODE, message)


class Invalid(_Coded):
    CODE = "bad_request"


class Unauthorized(_Coded):
    CODE = "unauthorized"


class Forbidden(_Coded):
    CODE = "forbidden"


class NotFound(_Coded):
    CODE = "not_found"


class Unavailable(_Coded):
    CODE = "unavailable"


class Conflict(_Coded):
    CODE = "conflict"


class RateLimited(_Coded):
    CODE = "rate_limited"


class UnknownMethod(_Coded):
    CODE = "unknown_method"


class Internal(_Coded):
    CODE = "internal"


ERRORS: tuple[type[_Coded], ...] = (
    Invalid,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    RateLimited,
    Unavailable,
    UnknownMethod,
    Internal,
)
