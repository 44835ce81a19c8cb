"""Failed-login throttling per account and per address (429), and token expiry (401)."""

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
ADDRESS_LIMIT = 10


def basic(username: str, password: str) -> dict[str, str]:
    """A Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


@pytest.fixture
async def throttled(aiohttp_client: Any, settings: Settings) -> TestClient:
    """A service that allows three failed passwords per account and ten failed logins per address per minute."""
    # A day-long window: the counters live in fixed windows, and a test crossing a window's end would see its
    # failures split in two (the minute the service uses by default is crossed now and then under load).
    return await aiohttp_client(create_app(settings.model_copy(
        update={"login_failure_limit": LIMIT, "login_address_failure_limit": ADDRESS_LIMIT,
                "login_failure_window_seconds": 86_400})))


async def test_failed_passwords_lock_that_account_only(throttled: TestClient) -> None:
    user = await register(throttled)
    for _ in range(LIMIT):
        response = await throttled.get("/api/users/myself/", headers=basic(user.username, "wrong password"))
        assert response.status == 401
    refused = await throttled.get("/api/users/myself/", headers=basic(user.username, PASSWORD))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["detail"] == "Too many failed logins for this account; try again later."
    # From another address too: the account is what is being guessed.
    url = f"http://127.0.0.1:{throttled.port}/api/users/myself/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        async with other.get(url, headers=basic(user.username, PASSWORD)) as response:
            assert response.status == 429
    # The account's token is never refused (160 random bits are no guess).
    assert (await throttled.get("/api/users/myself/", headers=user.headers)).status == 200


async def test_a_password_that_worked_before_is_refused_past_the_limit_too(aiohttp_client: Any, settings: Settings) -> None:
    """Past the limit a right password gets 429 like a wrong one, even one this process verified before: a 200
    there would tell a guesser which guess was right."""
    service = await aiohttp_client(create_app(settings.model_copy(
        update={"login_failure_limit": LIMIT, "login_address_failure_limit": ADDRESS_LIMIT,
                "login_failure_window_seconds": 86_400, "auth_cache_seconds": 0})))
    user = await register(service)
    assert (await service.get("/api/users/myself/", headers=basic(user.username, PASSWORD))).status == 200
    for _ in range(LIMIT):
        assert (await service.get("/api/users/myself/", headers=basic(user.username, "wrong password"))).status == 401
    assert (await service.get("/api/users/myself/", headers=basic(user.username, PASSWORD))).status == 429


async def test_frontend_users_behind_one_proxy_are_not_locked_out_by_one_guesser(throttled: TestClient) -> None:
    """DLR's web frontend sends Basic auth on every call; behind vite or nginx all users share one
    address. Before: 20 wrong passwords for anyone locked every user out for the window."""
    alice, bob = await register(throttled), await register(throttled)
    for _ in range(LIMIT + 2):  # someone guesses bob's password through the proxy
        await throttled.get("/api/users/myself/", headers=basic(bob.username, "guess"))
    for _ in range(3):  # alice keeps working with her password, from the same address
        response = await throttled.get("/api/users/myself/", headers=basic(alice.username, PASSWORD))
        assert response.status == 200
        assert (await response.json())["username"] == alice.username
    assert (await throttled.get("/api/users/myself/", headers=basic(bob.username, PASSWORD))).status == 429
    assert (await throttled.get("/api/users/myself/", headers=bob.headers)).status == 200


async def test_guessing_across_many_accounts_hits_the_address_ceiling(throttled: TestClient) -> None:
    victim = await register(throttled)
    for index in range(ADDRESS_LIMIT):  # one guess per name: no account reaches its own limit
        await throttled.get("/api/users/", headers=basic(f"name{index}", "guess"))
    refused = await throttled.get("/api/users/", headers=basic(victim.username, PASSWORD))
    assert refused.status == 429
    assert (await refused.json())["detail"] == "Too many failed logins for this address; try again later."
    # Wrong tokens count against the address as well and are refused past its ceiling...
    assert (await throttled.get("/api/users/", headers={"Authorization": "Token " + "0" * 40})).status == 429
    # ...valid ones never are.
    assert (await throttled.get("/api/users/myself/", headers=victim.headers)).status == 200
    # Another address is not affected.
    url = f"http://127.0.0.1:{throttled.port}/api/users/myself/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        async with other.get(url, headers=basic(victim.username, PASSWORD)) as response:
            assert response.status == 200


async def test_verified_credentials_are_not_slowed_by_other_failures(throttled: TestClient) -> None:
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
    client = await aiohttp_client(create_app(settings.model_copy(
        update={"login_failure_limit": 0, "login_address_failure_limit": 0})))
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
