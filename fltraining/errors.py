"""Domain errors; the HTTP layer turns each into a JSON error response."""

from typing import Any


class FLTrainingError(Exception):
    """Base of every error a client can cause; `status` is the HTTP status it maps to."""

    status: int = 400

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


class InvalidInput(FLTrainingError):
    """The request body or query is malformed or breaks a rule."""

    status = 400


class NotAuthenticated(FLTrainingError):
    """No credentials, or credentials that match no user."""

    status = 401


class PermissionDenied(FLTrainingError):
    """Authenticated, but not allowed to do this."""

    status = 403

    def __init__(
        self, detail: str = "You do not have permission to perform this action."
    ) -> None:
        super().__init__(detail)


class NotFound(FLTrainingError):
    """The resource does not exist (or its id is not a UUID)."""

    status = 404


class Conflict(FLTrainingError):
    """The request conflicts with the current state (wrong state, lost race, duplicate)."""

    status = 409


class PreconditionFailed(FLTrainingError):
    """An `If-Match` header named a version that is no longer current."""

    status = 412


class PayloadTooLarge(FLTrainingError):
    """The body is larger than the configured limit."""

    status = 413


class UnsupportedMediaType(FLTrainingError):
    """The body has the wrong content type."""

    status = 415


class TooManyRequests(FLTrainingError):
    """The client sent too many requests (e.g. failed logins); retry after `retry_after` seconds."""

    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class RequestTimeout(FLTrainingError):
    """The client stopped sending its request body, or sent it too slowly."""

    status = 408


class ClientClosedRequest(FLTrainingError):
    """The client closed the connection before its body arrived; logged as nginx's 499, sent to no one."""

    status = 499


class InsufficientStorage(FLTrainingError):
    """The server's disk is full: nothing was stored, the client may retry later."""

    status = 507


class ServiceUnavailable(FLTrainingError):
    """The service cannot take this work now (inference pool saturated or too slow); retry after `retry_after`."""

    status = 503

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
