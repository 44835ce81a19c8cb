"""Per-request observability: request ids, one log line per request, metrics."""

import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from routes.keys import metrics_key, request_id_key
from routes.metrics import collect

access_log = logging.getLogger("fltraining.access")
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def route_template(request: web.Request) -> str:
    """The matched route's template (never the concrete path, which holds ids)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observability_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id, time the request, log it once and count it."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request[request_id_key] = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        duration = time.perf_counter() - started
        route = route_template(request)
        request.app[metrics_key].observe(request.method, route, status, duration)
        access_log.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round(duration * 1000, 2),
                "request_id": request[request_id_key],
            },
        )


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Echo or hand out the request id on every response, streamed ones included."""
    if request_id_key in request:
        response.headers[REQUEST_ID_HEADER] = request[request_id_key]


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = await collect(request.app[metrics_key])
    return web.Response(text=body, content_type="text/plain", headers={"Cache-Control": "no-store"})
