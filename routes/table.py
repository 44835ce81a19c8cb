"""The endpoint table: one declaration per operation feeds both the router and the OpenAPI spec."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What one status answers: a schema, a list of it, a media type (a file) or None (no body).
type Answer = type[BaseModel] | list[type[BaseModel]] | str | None


@dataclass(frozen=True)
class Endpoint:
    """One HTTP operation: where it lives, who may call it, what it takes and answers."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    public: bool = False
    body: type[BaseModel] | None = None
    multipart: type[BaseModel] | None = None
    files: tuple[str, ...] = ("model_file",)  # the file parts of a multipart body
    query: type[BaseModel] | None = None
    # Per status: one answer, or a tuple of the alternatives a request chooses between (one media type each).
    responses: dict[int, Answer | tuple[Answer, ...]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    request_headers: tuple[str, ...] = ()
    description: str = ""
    operation_id: str = ""  # the OpenAPI operationId, unique; by default the handler's name


def documented_path(path: str) -> str:
    """The form a path is documented in: API paths end in a slash, unless they name a file."""
    bare = path.rstrip("/") or "/"
    if not bare.startswith("/api/") or "." in bare.rsplit("/", 1)[-1]:
        return bare
    return bare + "/"


def _variants(path: str) -> list[str]:
    bare = path.rstrip("/") or "/"
    return [bare] if bare == "/" else [bare, bare + "/"]


def add_endpoints(app: web.Application, endpoints: list[Endpoint]) -> None:
    """Register each endpoint with and without a trailing slash; other methods on a fixed path are 405, even
    where a parameterised path would match it (`/api/models/ensembles/` is not the model `ensembles`)."""
    allowed: dict[str, list[str]] = {}
    for endpoint in endpoints:
        for path in _variants(endpoint.path):
            app.router.add_route(endpoint.method, path, endpoint.handler)
        if "{" not in endpoint.path:
            allowed.setdefault(endpoint.path.rstrip("/") or "/", []).append(endpoint.method)
    for path, methods in allowed.items():
        for variant in _variants(path):
            app.router.add_route("*", variant, _method_not_allowed(methods))


def _method_not_allowed(methods: list[str]) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, methods)
    return refuse


def is_public(request: web.Request, endpoints: dict[Handler, Endpoint]) -> bool:
    """Whether the matched route needs no credentials (unknown routes need none to 404)."""
    route = request.match_info.route
    endpoint = endpoints.get(getattr(route, "handler", None))  # type: ignore[arg-type]
    return endpoint is None or endpoint.public
