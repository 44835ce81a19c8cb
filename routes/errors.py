"""One middleware that turns every error into a JSON body."""

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from fltraining.errors import FLTrainingError, NotAuthenticated, ServiceUnavailable, TooManyRequests
from fltraining.schemas.common import public_errors

log = logging.getLogger(__name__)

AUTH_CHALLENGE = {"WWW-Authenticate": "Token"}
_HTTP_DETAILS = {
    404: "Not found.",
    405: "Method not allowed.",
    413: "Request body too large.",
}


def json_error(status: int, detail: str, errors: list[dict[str, object]] | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """Build an error response with the contract's body."""
    body: dict[str, object] = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map domain errors, validation errors and aiohttp's own HTTP errors to JSON."""
    try:
        return await handler(request)
    except FLTrainingError as error:
        headers = AUTH_CHALLENGE if isinstance(error, NotAuthenticated) else None
        if isinstance(error, TooManyRequests | ServiceUnavailable):
            headers = {"Retry-After": str(error.retry_after)}
        return json_error(error.status, error.detail, error.errors, headers)
    except ValidationError as error:
        return json_error(400, "Invalid request.", public_errors(error.errors()))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        detail = _HTTP_DETAILS.get(error.status, error.reason)
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        return json_error(error.status, detail, headers=headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
        return json_error(500, "Internal server error.")
