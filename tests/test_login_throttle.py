"""Failed-login throttling per address (429) and token expiry (401)."""

import base64
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from fltraining.clock import utcnow
from fltraining.settings import Settings
from fltraining.storage.database import database_name, make_client
from routes.app import create_app
from tests.helpers import PASSWORD, register

LIMIT = 3


def basic(username: str, password: str) -> dict[str, str]:
    """A Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


@pytest.fixture
async def throttled(aiohttp_client: Any, settings: Settings) -> TestClient:
    """A service that allows three failed logins per address and minute."""
    return await aiohttp_client(create_app(settings.model_copy(update={"login_failure_limit": LIMIT})))


async def test_failed_logins_from_one_address_are_refused_with_429(throttled: TestClient) -> None:
    user = await register(throttled)
    for _ in range(LIMIT):
        response = await throttled.get("/api/users/myself/", headers=basic(user.username, "wrong password"))
        assert response.status == 401
    refused = await throttled.get("/api/users/myself/", headers=basic(user.username, PASSWORD))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["detail"].startswith("Too many failed logins")
    # Wrong tokens count against the same address, and are refused too.
    response = await throttled.get("/api/users/myself/", headers={"Authorization": "Token " + "0" * 40})
    assert response.status == 429
    # A valid token cannot be a guess: it still works from the throttled address (shared NATs).
    assert (await throttled.get("/api/users/myself/", headers=user.headers)).status == 200


async def test_another_address_is_not_locked_out(throttled: TestClient) -> None:
    user = await register(throttled)
    for _ in range(LIMIT + 1):
        await throttled.get("/api/users/myself/", headers=basic(user.username, "wrong password"))
    url = f"http://127.0.0.1:{throttled.port}/api/users/myself/"
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        async with other.get(url, headers=basic(user.username, PASSWORD)) as response:
            assert response.status == 200


async def test_verified_token_is_not_slowed_by_other_failures(throttled: TestClient) -> None:
    user = await register(throttled)
    assert (await throttled.get("/api/users/myself/", headers=user.headers)).status == 200
    for _ in range(LIMIT + 1):
        await throttled.get("/api/users/myself/", headers=basic(user.username, "wrong password"))
    # Within the credential cache's lifetime the known-good token is not a login attempt.
    assert (await throttled.get("/api/users/myself/", headers=user.headers)).status == 200


async def test_failures_are_shared_by_every_process_on_the_database(aiohttp_client: Any, settings: Settings) -> None:
    limited = settings.model_copy(update={"login_failure_limit": LIMIT})
    first, second = await aiohttp_client(create_app(limited)), await aiohttp_client(create_app(limited))
    user = await register(first)
    for index in range(LIMIT):
        process = first if index % 2 else second
        assert (await process.get("/api/users/", headers=basic(user.username, "nope"))).status == 401
    assert (await first.get("/api/users/", headers=basic(user.username, PASSWORD))).status == 429
    assert (await second.get("/api/users/", headers=basic(user.username, PASSWORD))).status == 429


async def test_limit_zero_disables_throttling(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"login_failure_limit": 0})))
    user = await register(client)
    for _ in range(10):
        assert (await client.get("/api/users/", headers=basic(user.username, "nope"))).status == 401
    assert (await client.get("/api/users/", headers=basic(user.username, PASSWORD))).status == 200


async def test_tokens_expire_after_the_configured_lifetime(aiohttp_client: Any, settings: Settings, database_url: str) -> None:
    expiring = settings.model_copy(update={"token_lifetime_days": 30, "auth_cache_seconds": 0})
    client = await aiohttp_client(create_app(expiring))
    user = await register(client)
    assert (await client.get("/api/users/myself/", headers=user.headers)).status == 200
    mongo = make_client(database_url)
    users = mongo[database_name(database_url, "x")]["users"]
    stored = await users.find_one({"username": user.username})
    assert stored is not None
    lifetime = stored["token_expires_at"] - utcnow()
    assert timedelta(days=29, hours=23) < lifetime <= timedelta(days=30)
    await users.update_one({"_id": stored["_id"]}, {"$set": {"token_expires_at": utcnow() - timedelta(seconds=1)}})
    await mongo.close()
    expired = await client.get("/api/users/myself/", headers=user.headers)
    assert expired.status == 401
    assert expired.headers["WWW-Authenticate"] == "Token"
    # The password still works: only the token expired.
    assert (await client.get("/api/users/myself/", headers=basic(user.username, PASSWORD))).status == 200


async def test_tokens_do_not_expire_by_default(client: TestClient, database_url: str) -> None:
    user = await register(client)
    mongo = make_client(database_url)
    stored = await mongo[database_name(database_url, "x")]["users"].find_one({"username": user.username})
    await mongo.close()
    assert stored is not None and stored["token_expires_at"] is None
