"""The pages for people: the dashboard's HTML at `/` (as HTTP; its behaviour in a browser is in
test_dashboard.py), its not-found page, and the built docs site at /docs/."""

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from fltraining.settings import Settings
from routes.app import create_app


async def landing_client(aiohttp_client: Any, settings: Settings, docs_dir: Path) -> TestClient:
    """A client for a service whose docs site lives (or not) in `docs_dir`."""
    return await aiohttp_client(create_app(settings.model_copy(update={"docs_dir": docs_dir})))


async def test_root_is_the_dashboard_page_with_its_headers(aiohttp_client: Any, settings: Settings,
                                                             tmp_path: Path) -> None:
    client = await landing_client(aiohttp_client, settings, tmp_path / "not-built")
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert '<script type="module" src="/assets/dashboard.js"></script>' in page
    for link in ('href="/api/docs"', 'href="/health"', 'href="/metrics"'):
        assert link in page
    assert "make docs" in page  # says how to get the docs site it cannot link to
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    for asset in ("dashboard.js", "charts.js", "dashboard.css", "favicon.svg"):
        served = await client.get(f"/assets/{asset}")
        assert served.status == 200 and served.headers["Cache-Control"] == "no-cache", asset


async def test_unknown_pages_are_the_dashboards_not_found_and_the_api_keeps_json(
        aiohttp_client: Any, settings: Settings, tmp_path: Path) -> None:
    client = await landing_client(aiohttp_client, settings, tmp_path / "not-built")
    for path in ("/docs/index.html", "/no/such/page", "/trainings/not-an-id"):
        missing = await client.get(path)
        assert missing.status == 404 and missing.content_type == "text/html", path
        assert "Page not found" in await missing.text()
        assert "<script" not in await missing.text()
    for method, path in (("GET", "/api/nowhere"), ("POST", "/no/such/page"), ("GET", "/assets/nothing.js")):
        refused = await client.request(method, path)
        assert refused.status == 404 and (await refused.json())["detail"], (method, path)
    wrong_method = await client.put("/api/models/00000000-0000-4000-8000-000000000000/metadata/")
    assert wrong_method.status == 405  # the catch-all never hides an API route's 405


async def test_built_docs_site_is_served_and_linked(aiohttp_client: Any, settings: Settings, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "assets").mkdir(parents=True)
    (site / "index.html").write_text("<html><body>fltraining docs</body></html>")
    (site / "assets" / "style.css").write_text("body{}")
    client = await landing_client(aiohttp_client, settings, site)
    page = await (await client.get("/")).text()
    assert 'href="/docs/index.html"' in page and "make docs" not in page
    for path in ("/docs", "/docs/"):
        front = await client.get(path)
        assert front.status == 200 and "fltraining docs" in await front.text()
    assert (await client.get("/docs/assets/style.css")).status == 200
    for outside in ("/docs/../pyproject.toml", "/docs/%2e%2e/%2e%2e/pyproject.toml", "/docs/assets/", "/docs/nothing.html"):
        refused = await client.get(outside)  # nothing outside the site, no listing
        assert refused.status == 404 and "[project]" not in await refused.text(), outside
