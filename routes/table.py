"""The endpoint table: one declaration per operation feeds both the router and the OpenAPI spec."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    responses: dict[int, type[BaseModel] | list[type[BaseModel]] | str | None] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    request_headers: tuple[str, ...] = ()
    description: str = ""


def documented_path(path: str) -> str:
    """The form a path is documented in: API paths end in a slash, unless they name a file."""
    bare = path.rstrip("/") or "/"
    if not bare.startswith("/api/") or "." in bare.rsplit("/", 1)[-1]:
        return bare
    return bare + "/"


def add_endpoints(app: web.Application, endpoints: list[Endpoint]) -> None:
    """Register each endpoint with and without a trailing slash."""
    for endpoint in endpoints:
        bare = endpoint.path.rstrip("/") or "/"
        paths = [bare] if bare == "/" else [bare, bare + "/"]
        for path in paths:
            app.router.add_route(endpoint.method, path, endpoint.handler)


def is_public(request: web.Request, endpoints: dict[Handler, Endpoint]) -> bool:
    """Whether the matched route needs no credentials (unknown routes need none to 404)."""
    route = request.match_info.route
    endpoint = endpoints.get(getattr(route, "handler", None))  # type: ignore[arg-type]
    return endpoint is None or endpoint.public
