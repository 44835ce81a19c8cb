"""Sign-in tokens (POST /api/sessions/): what the dashboard signs in with, and how they end."""

import base64
from datetime import timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient

from fltraining.clock import utcnow
from fltraining.settings import Settings
from routes.app import create_app
from tests.helpers import PASSWORD, register


def basic(username: str, password: str) -> dict[str, str]:
    """Basic credentials, as the dashboard's sign-in form sends them."""
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


async def test_sign_in_gives_a_token_of_its_own_that_signs_out(client: TestClient) -> None:
    alice = await register(client, first_name="Alice")
    started = await client.post("/api/sessions/", headers=basic(alice.username, PASSWORD))
    assert started.status == 201
    body = await started.json()
    assert body["user"]["id"] == alice.id and body["user"]["first_name"] == "Alice"
    assert body["token"] != alice.token and body["expires_at"].endswith("Z")
    signed_in = {"Authorization": f"Token {body['token']}"}
    assert (await (await client.get("/api/users/myself/", headers=signed_in)).json())["id"] == alice.id
    ended = await client.delete("/api/sessions/", headers=signed_in)
    assert ended.status == 200 and (await ended.json())["detail"] == "Signed out."
    assert (await client.get("/api/users/myself/", headers=signed_in)).status == 401
    # The user's own token is untouched by signing out.
    assert (await client.get("/api/users/myself/", headers=alice.headers)).status == 200


async def test_wrong_password_is_401_with_the_apis_message(client: TestClient) -> None:
    alice = await register(client)
    refused = await client.post("/api/sessions/", headers=basic(alice.username, "not the password"))
    assert refused.status == 401 and (await refused.json())["detail"] == "Invalid credentials."


async def test_only_a_sign_in_token_signs_out(client: TestClient) -> None:
    alice = await register(client)
    for headers in (alice.headers, basic(alice.username, PASSWORD)):
        refused = await client.delete("/api/sessions/", headers=headers)
        assert refused.status == 400 and "sign-in token" in (await refused.json())["detail"]
    assert (await client.get("/api/users/myself/", headers=alice.headers)).status == 200


async def test_expired_sign_in_is_refused(client: TestClient, database_url: str) -> None:
    alice = await register(client)
    body = await (await client.post("/api/sessions/", headers=basic(alice.username, PASSWORD))).json()
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(database_url)
    try:
        await mongo.get_default_database()["sessions"].update_many(
            {}, {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}})
    finally:
        await mongo.close()
    expired = await client.get("/api/users/myself/", headers={"Authorization": f"Token {body['token']}"})
    assert expired.status == 401


async def test_sign_ins_are_stored_as_hashes_and_go_with_their_user(client: TestClient, database_url: str) -> None:
    alice = await register(client)
    body = await (await client.post("/api/sessions/", headers=basic(alice.username, PASSWORD))).json()
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(database_url)
    try:
        sessions = mongo.get_default_database()["sessions"]
        stored = await sessions.find_one({})
        assert stored is not None and body["token"] not in str(stored)
        signed_in = {"Authorization": f"Token {body['token']}"}
        assert (await client.delete("/api/users/myself/", headers=signed_in)).status == 200
        assert await sessions.count_documents({}) == 0
    finally:
        await mongo.close()


async def test_session_lifetime_is_the_setting(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"session_hours": 2})))
    alice = await register(client)
    before = utcnow()
    body = await (await client.post("/api/sessions/", headers=basic(alice.username, PASSWORD))).json()
    expires = body["expires_at"]
    assert expires > (before + timedelta(hours=2) - timedelta(seconds=5)).isoformat()[:19]
    assert expires < (before + timedelta(hours=2, seconds=30)).isoformat()[:19]
