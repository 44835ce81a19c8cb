"""Authentication: the four accepted forms, the two 401 answers and the open endpoints."""

import asyncio
import base64
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fltraining.security import PasswordHashing
from fltraining.settings import Settings
from fltraining.storage.database import database_name, make_client
from routes.app import create_app
from tests.helpers import PASSWORD, Account, register

MISSING = "Authentication credentials were not provided."
INVALID = "Invalid credentials."


def basic(user: str, password: str) -> str:
    """A Basic Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def assert_401(response: Any, detail: str) -> None:
    """A 401 with the contract's body and a Token (never Basic) challenge."""
    assert response.status == 401, await response.text()
    assert response.content_type == "application/json"
    assert await response.json() == {"detail": detail}
    challenges = response.headers.getall("WWW-Authenticate")
    assert challenges == ["Token"]
    assert not any("basic" in challenge.lower() for challenge in challenges)


@pytest.mark.parametrize(
    "scheme",
    [
        lambda a: f"Token {a.token}",
        lambda a: f"Bearer {a.token}",
        lambda a: f"token {a.token}",
        lambda a: basic(a.username, PASSWORD),
        lambda a: basic(a.token, ""),
    ],
    ids=["token", "bearer", "lower-case scheme", "basic password", "basic token"],
)
async def test_accepted_credentials(client: TestClient, scheme: Any) -> None:
    me = await register(client)
    response = await client.get("/api/users/myself/", headers={"Authorization": scheme(me)})
    assert response.status == 200, await response.text()
    assert (await response.json())["id"] == me.id


@pytest.mark.parametrize(
    "path", ["/api/users/", "/api/users/myself/", "/api/models/", "/api/trainings/", "/api/users/trainings/"]
)
async def test_no_credentials_is_401(client: TestClient, path: str) -> None:
    await assert_401(await client.get(path), MISSING)


async def test_no_credentials_on_a_write_is_401_before_the_body_is_read(client: TestClient) -> None:
    await assert_401(await client.post("/api/trainings/", data=b"not json"), MISSING)


@pytest.mark.parametrize(
    "header",
    [
        lambda a: "Token " + "0" * 40,
        lambda a: "Bearer " + a.token[:-1] + ("0" if a.token[-1] != "0" else "1"),
        lambda a: "Token " + a.token.upper(),
        lambda a: "Token",
        lambda a: "Token ",
        lambda a: basic(a.username, "wrong password"),
        lambda a: basic(a.username, PASSWORD + " "),
        lambda a: basic("nobody-here", PASSWORD),
        lambda a: basic("nobody-here", ""),
        lambda a: basic("", PASSWORD),
        lambda a: basic(a.username, ""),
        lambda a: "Basic !!!not-base64!!!",
        lambda a: "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        lambda a: "Basic " + base64.b64encode(a.token.encode()).decode(),
        lambda a: "Basic " + base64.b64encode(a.username.encode()).decode(),
        lambda a: "Basic",
        lambda a: f"Digest {a.token}",
        lambda a: f"Tok {a.token}",
        lambda a: a.token,
        lambda a: "Token " + "a" * 5_000,
    ],
    ids=[
        "unknown token",
        "altered token",
        "upper-cased token",
        "token scheme alone",
        "token scheme and space",
        "wrong password",
        "password with extra space",
        "unknown user",
        "unknown user empty password",
        "empty user name",
        "user name with empty password",
        "malformed base64",
        "non-utf8 basic",
        "basic token without colon",
        "basic user without colon",
        "basic alone",
        "unknown scheme digest",
        "unknown scheme tok",
        "bare token",
        "oversized header",
    ],
)
async def test_bad_credentials_are_401(client: TestClient, header: Any) -> None:
    me = await register(client)
    await assert_401(await client.get("/api/users/myself/", headers={"Authorization": header(me)}), INVALID)


async def test_deleted_user_loses_access(client: TestClient) -> None:
    me = await register(client)
    response = await client.delete("/api/users/myself/", headers=me.headers)
    assert response.status == 200
    assert await response.json() == {"detail": "User removed!"}
    await assert_401(await client.get("/api/users/myself/", headers=me.headers), INVALID)
    await assert_401(
        await client.get("/api/users/", headers={"Authorization": basic(me.username, PASSWORD)}), INVALID
    )


async def test_a_user_only_ever_acts_as_itself(client: TestClient) -> None:
    first = await register(client)
    second = await register(client)
    for account in (first, second):
        body = await (await client.get("/api/users/myself/", headers=account.headers)).json()
        assert body["id"] == account.id


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/health", 200),
        ("GET", "/api/openapi.json", 200),
        ("GET", "/api/docs", 200),
        ("GET", "/api/docs/", 200),
    ],
)
async def test_open_endpoints_need_no_credentials(
    client: TestClient, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status == status
    # Bad credentials sent along do not lock anyone out of an open endpoint either.
    response = await client.request(method, path, headers={"Authorization": "Token " + "0" * 40})
    assert response.status == status


async def test_registration_needs_no_credentials(client: TestClient) -> None:
    response = await client.post("/api/users/", json={"username": "newcomer", "password": PASSWORD})
    assert response.status == 201
    response = await client.post(
        "/api/users/",
        json={"username": "newcomer2", "password": PASSWORD},
        headers={"Authorization": "Token bogus"},
    )
    assert response.status == 201


async def test_token_is_shown_only_at_registration(client: TestClient) -> None:
    me: Account = await register(client)
    bodies = [
        await (await client.get("/api/users/myself/", headers=me.headers)).text(),
        await (await client.get(f"/api/users/{me.id}/", headers=me.headers)).text(),
        await (await client.get("/api/users/", headers=me.headers)).text(),
    ]
    for body in bodies:
        assert me.token not in body
        assert "token" not in body
        assert "password" not in body


@pytest.fixture
async def uncached(aiohttp_client: Any, settings: Settings) -> TestClient:
    """A service that trusts no verified credentials without reading the user again."""
    return await aiohttp_client(create_app(settings.model_copy(update={"auth_cache_seconds": 0})))


async def test_a_password_changed_in_the_database_stops_the_old_one(
        uncached: TestClient, settings: Settings, database_url: str) -> None:
    me = await register(uncached)
    old = {"Authorization": basic(me.username, PASSWORD)}
    assert (await uncached.get("/api/users/myself/", headers=old)).status == 200
    mongo = make_client(database_url)
    new_hash = PasswordHashing(settings.password_hash_time_cost).hash("another password")
    await mongo[database_name(database_url, "x")]["users"].update_one(
        {"username": me.username}, {"$set": {"password_hash": new_hash}})
    await mongo.close()
    await assert_401(await uncached.get("/api/users/myself/", headers=old), INVALID)
    new = {"Authorization": basic(me.username, "another password")}
    assert (await uncached.get("/api/users/myself/", headers=new)).status == 200


async def test_a_user_deleted_in_the_database_loses_access(uncached: TestClient, database_url: str) -> None:
    me = await register(uncached)
    for headers in (me.headers, {"Authorization": basic(me.username, PASSWORD)}):
        assert (await uncached.get("/api/users/myself/", headers=headers)).status == 200
    mongo = make_client(database_url)
    await mongo[database_name(database_url, "x")]["users"].delete_one({"username": me.username})
    await mongo.close()
    for headers in (me.headers, {"Authorization": basic(me.username, PASSWORD)}):
        await assert_401(await uncached.get("/api/users/myself/", headers=headers), INVALID)


async def test_a_returning_password_is_not_hashed_again(uncached: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    me = await register(uncached)
    verified: list[str] = []
    original = PasswordHashing.verify
    monkeypatch.setattr(PasswordHashing, "verify", lambda self, stored, password: verified.append(password) or
                        original(self, stored, password))
    headers = {"Authorization": basic(me.username, PASSWORD)}
    for _ in range(3):
        assert (await uncached.get("/api/users/myself/", headers=headers)).status == 200
    # The first request proves the password; the later ones find the same stored hash and need no hashing.
    assert verified == [PASSWORD]
    await assert_401(await uncached.get("/api/users/myself/", headers={"Authorization": basic(me.username, "wrong one")}),
                     INVALID)
    assert verified == [PASSWORD, "wrong one"]


async def test_many_clients_authenticating_at_once_are_each_recognised(uncached: TestClient) -> None:
    accounts = [await register(uncached) for _ in range(12)]
    answers = await asyncio.gather(*(uncached.get("/api/users/myself/", headers=account.headers) for account in accounts))
    assert [(await answer.json())["username"] for answer in answers] == [account.username for account in accounts]
