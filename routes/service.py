"""Service endpoints: health, the OpenAPI document and its offline docs page."""

import asyncio
import importlib.resources
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel
from pymongo.errors import PyMongoError

from routes.keys import database_name_key, mongo_client_key, openapi_key
from routes.observability import metrics
from routes.table import Endpoint

DOCS_ASSETS = "/api/docs/assets"
HEALTH_TIMEOUT_SECONDS = 2.0
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fltraining API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/swagger-ui-standalone-preset.js"></script>
<script src="{assets}/docs-init.js"></script>
</body></html>
"""
DOCS_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "StandaloneLayout"});
};
"""


class Health(BaseModel):
    """GET /health answer."""

    status: str
    database: str


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 when the database answers a ping, else 503."""
    client = request.app[mongo_client_key]
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            await client[request.app[database_name_key]].command("ping")
    except (PyMongoError, TimeoutError):
        return web.json_response({"status": "unavailable", "database": "unreachable"}, status=503)
    return web.json_response({"status": "ok", "database": "ok"})


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json."""
    return web.json_response(request.app[openapi_key])


async def docs(request: web.Request) -> web.Response:
    """GET /api/docs: Swagger UI served from the installed package (works offline)."""
    return web.Response(text=DOCS_PAGE.format(assets=DOCS_ASSETS), content_type="text/html")


async def docs_init(request: web.Request) -> web.Response:
    """The page's start-up script (kept out of the HTML so a strict CSP can forbid inline code)."""
    return web.Response(text=DOCS_INIT, content_type="application/javascript")


def add_docs_assets(app: web.Application) -> None:
    """Serve Swagger UI 5 (it renders OpenAPI 3.1) from the swagger-ui-py package's static files."""
    app.router.add_get(DOCS_ASSETS + "/docs-init.js", docs_init)
    assets = Path(str(importlib.resources.files("swagger_ui") / "static"))
    app.router.add_static(DOCS_ASSETS, assets, follow_symlinks=False)


ENDPOINTS = [
    Endpoint("GET", "/health", health, "Service and database health", "service", public=True,
             responses={200: Health}, errors=(503,)),
    Endpoint("GET", "/api/openapi.json", openapi, "This OpenAPI document", "service", public=True,
             responses={200: None}),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics of every service process", "service",
             public=True, responses={200: "text/plain"}),
    Endpoint("GET", "/api/docs", docs, "Interactive API docs", "service", public=True,
             responses={200: "text/html"}),
]
