"""Fixtures: one suite, run against the embedded wire store or any MongoDB URL given."""

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.settings import Settings
from fltraining.storage.database import database_name, init_database, make_client
from fltraining.storage.embedded import EmbeddedStore
from routes.app import create_app
from tests.fl_clients import SimulatedClient, start_clients, stop_clients
from tests.processes import RUNNING

TEST_URL_VARIABLE = "FLTRAINING_TEST_MONGODB_URL"
# The blob store tier: `files` (the embedded default) unless FLTRAINING_BLOB_STORE says `gridfs`.
BLOB_STORE = "gridfs" if os.environ.get("FLTRAINING_BLOB_STORE") == "gridfs" else "files"


def with_database(url: str, name: str) -> str:
    """The same URL with its path naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Point a reviewer at the dashboard's screenshots, when the browser tests took any."""
    from tests.browser import SCREENSHOTS  # only here: the rest of the suite needs no Playwright

    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.iterdir()):
        terminalreporter.write_line(f"dashboard screenshots: {SCREENSHOTS.resolve()}")


@pytest.fixture(scope="session")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The MongoDB under test: the URL in the environment, else a fresh embedded store."""
    given = os.environ.get(TEST_URL_VARIABLE)
    if given:
        yield given
        return
    with EmbeddedStore(tmp_path_factory.mktemp("store")) as store:
        yield store.url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failing test's report ends with what the services it ran beside logged last."""
    report: pytest.TestReport = yield
    if report.failed:
        for service in sorted(RUNNING, key=lambda running: running.port):
            report.sections.append((f"service on port {service.port}: last log lines", service.log_tail()))
    return report


def pytest_report_header() -> str:
    """Say which blob store tier runs."""
    return f"fltraining blob store: {BLOB_STORE}"


@pytest.fixture(scope="session")
def backend_name() -> str:
    """Which backend the suite runs on, for the reasons printed by backend-specific skips."""
    return "MongoDB at $" + TEST_URL_VARIABLE if os.environ.get(TEST_URL_VARIABLE) else "embedded mongoeco store"


@pytest.fixture
async def database_url(store_url: str) -> AsyncIterator[str]:
    """A URL naming a fresh database, dropped after the test."""
    name = f"fltraining_test_{uuid.uuid4().hex[:12]}"
    url = with_database(store_url, name)
    yield url
    client = make_client(store_url)
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def raw_db(database_url: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """The test database through a plain PyMongo client, to see what is stored."""
    mongo: AsyncMongoClient[dict[str, Any]] = make_client(database_url)
    yield mongo[database_name(database_url, "fltraining")]
    await mongo.close()


@pytest.fixture
async def beanie_db(raw_db: AsyncDatabase[dict[str, Any]]) -> AsyncDatabase[dict[str, Any]]:
    """The test database with validators, indexes and Beanie bound to it (no HTTP service)."""
    await init_database(raw_db)
    return raw_db


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Test settings on the fresh database (cheap password hashing)."""
    return Settings(mongodb_url=database_url, data_dir=tmp_path, password_hash_time_cost=1, blob_store=BLOB_STORE)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:
    """An HTTP client for a service built from the test settings."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def engine_settings(settings: Settings) -> Settings:
    """Settings for round-engine tests: notifications to loopback clients, fast reconciling and retries."""
    return settings.model_copy(update={
        "notification_allow_loopback": True,
        "reconcile_interval_seconds": 0.2,
        "notification_backoff_seconds": 0.05,
        "lock_lease_seconds": 2,
    })


@pytest.fixture
async def api(aiohttp_client: Any, engine_settings: Settings) -> TestClient:
    """An HTTP client for a service with the round-engine test settings."""
    return await aiohttp_client(create_app(engine_settings))


@pytest.fixture
async def clients(api: TestClient) -> AsyncIterator[list[SimulatedClient]]:
    """Three simulated FL clients (own notification servers) with sample sizes 1, 2, 3."""
    clients = await start_clients(api, 3)
    for client in clients:
        client.sample_size = client.index + 1
    yield clients
    await stop_clients(clients)
