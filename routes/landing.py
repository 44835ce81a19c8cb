"""`GET /`: a small page for a person who opens the service in a browser, and the built docs site at /docs/."""

from html import escape
from pathlib import Path

from aiohttp import web

from fltraining import __version__
from routes.keys import docs_site_key
from routes.table import Endpoint

DOCS_SITE = "/docs"
# The page runs no script and loads nothing from another host; it is never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>fltraining</title></head>
<body><main>
<h1>fltraining {version}</h1>
<p>The training-management core of a federated learning server: trainings, their models and their participants
as MongoDB documents behind a JSON HTTP API that DLR's frontend and Python client use unchanged.</p>
<ul>
<li><a href="/api/docs">Interactive API docs</a> (Swagger UI) and the <a href="/api/openapi.json">OpenAPI document</a></li>
<li>{docs}</li>
<li><a href="/health">Health</a> and <a href="/metrics">Prometheus metrics</a></li>
</ul>
<p>Every call under <code>/api/</code> takes <code>Authorization: Token &lt;token&gt;</code> or Basic credentials;
<code>fltraining createuser NAME</code> prints a token.</p>
</main></body></html>
"""


def docs_index(docs_dir: Path) -> Path | None:
    """The built docs site's front page, when `make docs` has built it."""
    index = docs_dir / "index.html"
    return index if index.is_file() else None


async def landing(request: web.Request) -> web.Response:
    """GET /: what this service is, with links to the API docs, the docs site, health and metrics."""
    if request.app[docs_site_key]:
        docs = f'<a href="{DOCS_SITE}/index.html">Documentation</a>: getting started, running trainings, deployment'
    else:
        docs = "Documentation: not built here (<code>make docs</code> builds it into <code>site/</code>)"
    page = PAGE.format(version=escape(__version__), docs=docs)
    return web.Response(text=page, content_type="text/html", headers=PAGE_HEADERS)


async def docs_front(request: web.Request) -> web.StreamResponse:
    """GET /docs and /docs/: the docs site's front page."""
    raise web.HTTPFound(f"{DOCS_SITE}/index.html")


def add_docs_site(app: web.Application, docs_dir: Path) -> None:
    """Serve the built docs site at /docs/ (static files, no listing) when it is built at start-up."""
    app[docs_site_key] = docs_index(docs_dir) is not None
    if not app[docs_site_key]:
        return
    app.router.add_get(DOCS_SITE, docs_front)
    app.router.add_get(DOCS_SITE + "/", docs_front)
    app.router.add_static(DOCS_SITE, docs_dir, follow_symlinks=False)


ENDPOINTS = [
    Endpoint("GET", "/", landing, "A page for people: links to the API docs, the docs site, health", "service",
             public=True, responses={200: "text/html"}),
]
