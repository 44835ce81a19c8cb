"""The dashboard's pages: one HTML shell for `/` and `/trainings/{id}`, its assets, and its own 404 page.

The pages hold no data: their script signs in through the JSON API, keeps the token in `sessionStorage`
and reads everything else from the API, as any client does.
"""

import importlib.resources
import re
from html import escape
from pathlib import Path

from aiohttp import web

from fltraining import __version__
from routes.keys import docs_site_key

ASSETS = "/assets"
ASSET_FILES = Path(str(importlib.resources.files("routes") / "static"))
ASSET_NAMES = frozenset(path.name for path in ASSET_FILES.iterdir() if path.is_file())
# Scripts and styles only from this service (no inline code), nothing framed, nothing sent elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# Every path that is not the API's is the dashboard's: a GET of an unknown one is its "not found" page.
NOT_API = r"{tail:(?!api(?:/|$)).+}"
TRAINING_PAGE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/?$")

SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{assets}/dashboard.css"><link rel="icon" href="{assets}/favicon.svg" type="image/svg+xml">
{script}</head>
<body>
<header><a class="brand" href="/">fltraining</a>
<nav aria-label="Account"><span id="who"></span> <button id="signout" type="button" hidden>Sign out</button></nav></header>
<main id="main">{main}</main>
<footer><a href="/api/docs">API docs</a> · {docs} · <a href="/health">Health</a> · <a href="/metrics">Metrics</a>
· fltraining {version}</footer>
</body></html>
"""
NO_SCRIPT = ('<noscript><p>The dashboard needs JavaScript. The interactive API docs at <a href="/api/docs">/api/docs</a> '
             "do too; the JSON API itself does not.</p></noscript>")
NOT_FOUND = '<h1>Page not found</h1><p>There is no page here. <a href="/">All trainings</a></p>'


def page(request: web.Request, title: str, main: str, with_script: bool, status: int = 200) -> web.Response:
    """A dashboard page: the shared header and footer around `main` (trusted HTML; never user data)."""
    docs = ('<a href="/docs/index.html">Documentation</a>' if request.app[docs_site_key]
            else "Documentation: <code>make docs</code>")
    script = f'<script type="module" src="{ASSETS}/dashboard.js"></script>\n' if with_script else ""
    text = SHELL.format(title=escape(title), assets=ASSETS, script=script, main=main, docs=docs,
                        version=escape(__version__))
    return web.Response(text=text, status=status, content_type="text/html", headers=PAGE_HEADERS)


async def dashboard(request: web.Request) -> web.Response:
    """GET /: the dashboard (sign-in, then the trainings table)."""
    return page(request, "fltraining", NO_SCRIPT, with_script=True)


async def training_page(request: web.Request) -> web.Response:
    """GET /trainings/{id}: one training, live; an id that is no UUID is the "not found" page."""
    if not TRAINING_PAGE.match(request.match_info["training_id"]):
        return page(request, "Not found · fltraining", NOT_FOUND, with_script=False, status=404)
    return page(request, "Training · fltraining", NO_SCRIPT, with_script=True)


async def not_found(request: web.Request) -> web.Response:
    """Any other path outside /api/: the dashboard's "not found" page for a browser, JSON 404 otherwise."""
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPNotFound()  # turned into the API's JSON 404 by the error middleware
    return page(request, "Not found · fltraining", NOT_FOUND, with_script=False, status=404)


async def asset(request: web.Request) -> web.StreamResponse:
    """GET /assets/{name}: one of the dashboard's files, asked for again each time (a cheap 304), so an
    upgrade shows at once; any other name is the API's JSON 404."""
    name = request.match_info["name"]
    if name not in ASSET_NAMES:
        raise web.HTTPNotFound()
    return web.FileResponse(ASSET_FILES / name, headers={"Cache-Control": "no-cache"})


def add_dashboard(app: web.Application) -> None:
    """Route the dashboard's pages and assets; call last: its catch-all yields to every other route."""
    app.router.add_get("/", dashboard)
    app.router.add_get("/trainings/{training_id:.+}", training_page)
    app.router.add_get(ASSETS + "/{name}", asset)
    app.router.add_route("*", "/" + NOT_API, not_found)
