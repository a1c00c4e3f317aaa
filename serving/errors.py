"""Transport-neutral request errors (mapped to gRPC status codes and HTTP statuses)."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Error codes, named as ``grpc.StatusCode`` members."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """A request error carrying a :class:`Code` and a client-facing message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    """Returns an INVALID_ARGUMENT error."""
    return ServingError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    """Returns a NOT_FOUND error."""
    return ServingError(Code.NOT_FOUND, message)


def deadline_exceeded(message: str) -> ServingError:
    """Returns a DEADLINE_EXCEEDED error."""
    return ServingError(Code.DEADLINE_EXCEEDED, message)
