"""The built docs site (`make docs`), served at /docs/ when it is there at start-up."""

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from routes.keys import docs_site_key

DOCS_SITE = "/docs"


def docs_index(docs_dir: Path) -> Path | None:
    """The built docs site's front page, when `make docs` has built it."""
    index = docs_dir / "index.html"
    return index if index.is_file() else None


async def docs_front(request: web.Request) -> web.StreamResponse:
    """GET /docs and /docs/: the docs site's front page."""
    raise web.HTTPFound(f"{DOCS_SITE}/index.html")


def docs_file(root: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of /docs/{path}: a file of the built site, never one outside it, else the JSON 404."""
    base = root.resolve()

    async def serve(request: web.Request) -> web.StreamResponse:
        wanted = (base / request.match_info["path"]).resolve()
        if not wanted.is_relative_to(base) or not wanted.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(wanted)

    return serve


def add_docs_site(app: web.Application, docs_dir: Path) -> None:
    """Serve the built docs site at /docs/ (its files, no listing) when it is built at start-up."""
    app[docs_site_key] = docs_index(docs_dir) is not None
    if not app[docs_site_key]:
        return
    app.router.add_get(DOCS_SITE, docs_front)
    app.router.add_get(DOCS_SITE + "/", docs_front)
    app.router.add_get(DOCS_SITE + "/{path:.+}", docs_file(docs_dir))
