"""`GET /` for a person with a browser, and the built docs site at /docs/."""

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from fltraining.settings import Settings
from routes.app import create_app


async def landing_client(aiohttp_client: Any, settings: Settings, docs_dir: Path) -> TestClient:
    """A client for a service whose docs site lives (or not) in `docs_dir`."""
    return await aiohttp_client(create_app(settings.model_copy(update={"docs_dir": docs_dir})))


async def test_root_is_a_page_linking_to_the_api_docs(aiohttp_client: Any, settings: Settings, tmp_path: Path) -> None:
    client = await landing_client(aiohttp_client, settings, tmp_path / "not-built")
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    for link in ('href="/api/docs"', 'href="/api/openapi.json"', 'href="/health"'):
        assert link in page
    assert "make docs" in page  # says how to get the docs site it cannot link to
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "script" not in page
    # Without a built site there is nothing at /docs/: a JSON 404 like any unknown path.
    missing = await client.get("/docs/index.html")
    assert missing.status == 404 and (await missing.json())["detail"]


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
    assert (await client.get("/docs/../pyproject.toml")).status == 404
    assert (await client.get("/docs/assets/")).status in {403, 404}  # no directory listing
