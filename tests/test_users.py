"""Users: registration rules, the public user JSON, lookups and stored secrets."""

import re
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fltraining.settings import Settings
from fltraining.storage.database import database_name, make_client
from routes.app import create_app
from tests.helpers import PASSWORD, register

USER_KEYS = {"id", "username", "email", "first_name", "last_name", "actor", "client", "message_endpoint"}


async def post_user(http: TestClient, /, **body: Any) -> Any:
    """POST /api/users/ with a complete, valid body overridden by `body`."""
    payload = {"username": f"u{uuid.uuid4().hex[:10]}", "password": PASSWORD, **body}
    return await http.post("/api/users/", json=payload)


async def test_registration_returns_the_user_with_a_token_and_location(client: TestClient) -> None:
    response = await client.post(
        "/api/users/",
        json={
            "username": "ada",
            "password": PASSWORD,
            "email": "ada@example.org",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "actor": True,
            "client": False,
            "message_endpoint": "http://ada.example.org/hook",
        },
    )
    assert response.status == 201, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == USER_KEYS | {"token"}
    assert re.fullmatch(r"[0-9a-f]{40}", body["token"])
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert response.headers["Location"] == f"/api/users/{body['id']}/"
    assert body["username"] == "ada"
    assert body["email"] == "ada@example.org"
    assert (body["first_name"], body["last_name"]) == ("Ada", "Lovelace")
    assert (body["actor"], body["client"]) == (True, False)
    assert body["message_endpoint"] == "http://ada.example.org/hook"


async def test_registration_defaults(client: TestClient) -> None:
    response = await post_user(client)
    body = await response.json()
    assert response.status == 201
    assert body["email"] == body["first_name"] == body["last_name"] == ""
    assert body["actor"] is False and body["client"] is False
    assert body["message_endpoint"] is None


async def test_each_registration_gets_its_own_token(client: TestClient) -> None:
    first = await register(client)
    second = await register(client)
    assert first.token != second.token
    assert first.id != second.id


@pytest.mark.parametrize("username", ["a", "x" * 150, "user.name+tag@example-org_1", "0123"])
async def test_valid_usernames(client: TestClient, username: str) -> None:
    response = await post_user(client, username=username)
    assert response.status == 201, await response.text()
    assert (await response.json())["username"] == username


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("username", ""),
        ("username", "x" * 151),
        ("username", "with space"),
        ("username", " leading"),
        ("username", "tab\there"),
        ("username", "jürgen"),
        ("username", "用户"),
        ("username", "semi;colon"),
        ("username", "slash/name"),
        ("username", 123),
        ("username", None),
        ("password", "Xq7!zp"),
        ("password", "Kw9#mQ2"),
        ("password", 12345678),
        ("password", "nul\x00inside"),
        ("actor", "yes"),
        ("client", 1),
        ("email", ["a@b.c"]),
        ("message_endpoint", "not a url"),
        ("first_name", "x" * 151),
    ],
    ids=lambda value: repr(value)[:20],
)
async def test_invalid_fields_are_400(client: TestClient, field: str, value: Any) -> None:
    response = await post_user(client, **{field: value})
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["detail"]
    assert any(error["loc"][0] == field for error in body["errors"])
    if field == "password" and isinstance(value, str):
        assert value not in await response.text()  # a rejected password is never echoed


@pytest.mark.parametrize("missing", ["username", "password"])
async def test_missing_required_field_is_400(client: TestClient, missing: str) -> None:
    payload = {"username": "someone", "password": PASSWORD}
    del payload[missing]
    response = await client.post("/api/users/", json=payload)
    assert response.status == 400
    assert [missing] in [error["loc"] for error in (await response.json())["errors"]]


async def test_password_of_exactly_eight_characters_is_accepted(client: TestClient) -> None:
    response = await post_user(client, password="12345678")
    assert response.status == 201


@pytest.mark.parametrize("extra", [{"is_superuser": True}, {"token": "0" * 40}, {"id": str(uuid.uuid4())}])
async def test_unknown_keys_are_400(client: TestClient, extra: dict[str, Any]) -> None:
    response = await post_user(client, **extra)
    assert response.status == 400
    body = await response.json()
    assert [next(iter(extra))] in [error["loc"] for error in body["errors"]]


async def test_taken_username_is_409_and_the_first_user_is_kept(client: TestClient) -> None:
    first = await register(client, "taken")
    response = await client.post("/api/users/", json={"username": "taken", "password": "another password"})
    assert response.status == 409
    assert "taken" in (await response.json())["detail"]
    # The original account still works with its token and password.
    response = await client.get("/api/users/myself/", headers=first.headers)
    assert (await response.json())["id"] == first.id
    users = await (await client.get("/api/users/", headers=first.headers)).json()
    assert [user["username"] for user in users].count("taken") == 1


async def test_registration_closed_by_setting_is_403(
    aiohttp_client: Any, client: TestClient, settings: Settings
) -> None:
    closed = await aiohttp_client(create_app(settings.model_copy(update={"registration_open": False})))
    response = await closed.post("/api/users/", json={"username": "latecomer", "password": PASSWORD})
    assert response.status == 403
    assert "detail" in await response.json()
    # Nothing was written: the same database, through an open server, knows no such user.
    viewer = await register(client)
    users = await (await client.get("/api/users/", headers=viewer.headers)).json()
    assert "latecomer" not in [user["username"] for user in users]
    # Existing users still authenticate on the closed server.
    response = await closed.get("/api/users/myself/", headers=viewer.headers)
    assert response.status == 200


async def test_list_users_shows_public_json_only(client: TestClient) -> None:
    alice = await register(client, "alice", email="alice@example.org")
    bob = await register(client, "bob")
    response = await client.get("/api/users/", headers=alice.headers)
    assert response.status == 200
    users = await response.json()
    assert {user["id"] for user in users} == {alice.id, bob.id}
    for user in users:
        assert set(user) == USER_KEYS
    assert {user["username"]: user["email"] for user in users} == {"alice": "alice@example.org", "bob": ""}


async def test_myself(client: TestClient) -> None:
    me = await register(client, first_name="Grace")
    response = await client.get("/api/users/myself/", headers=me.headers)
    assert response.status == 200
    body = await response.json()
    assert set(body) == USER_KEYS
    assert (body["id"], body["username"], body["first_name"]) == (me.id, me.username, "Grace")


async def test_get_user_by_id(client: TestClient) -> None:
    me = await register(client)
    registered = await (await post_user(client, client=True)).json()
    response = await client.get(f"/api/users/{registered['id']}/", headers=me.headers)
    assert response.status == 200
    body = await response.json()
    assert set(body) == USER_KEYS
    assert (body["id"], body["username"], body["client"]) == (registered["id"], registered["username"], True)


@pytest.mark.parametrize(
    "path_id", [str(uuid.uuid4()), "not-a-uuid", "1", str(uuid.uuid4()).replace("-", "")[:31]]
)
async def test_unknown_or_malformed_user_id_is_404(client: TestClient, path_id: str) -> None:
    me = await register(client)
    response = await client.get(f"/api/users/{path_id}/", headers=me.headers)
    assert response.status == 404
    assert "detail" in await response.json()


@pytest.mark.parametrize("path", ["/api/users", "/api/users/myself"])
async def test_user_paths_work_without_trailing_slash(client: TestClient, path: str) -> None:
    me = await register(client)
    response = await client.get(path, headers=me.headers)
    assert response.status == 200


async def test_registration_without_trailing_slash(client: TestClient) -> None:
    response = await client.post("/api/users", json={"username": "noslash", "password": PASSWORD})
    assert response.status == 201


async def test_stored_user_holds_no_secret_in_the_clear(client: TestClient, database_url: str) -> None:
    me = await register(client, "secretive")
    mongo = make_client(database_url)
    try:
        document = await mongo[database_name(database_url, "fltraining")]["users"].find_one(
            {"username": "secretive"}
        )
    finally:
        await mongo.close()
    assert document is not None
    assert document["_id"] == uuid.UUID(me.id)
    stored = repr(document)
    assert me.token not in stored
    assert PASSWORD not in stored
    assert document["password_hash"].startswith("$argon2id$")


async def test_deleting_myself_removes_the_user(client: TestClient) -> None:
    me = await register(client)
    other = await register(client)
    response = await client.delete("/api/users/myself/", headers=me.headers)
    assert response.status == 200
    response = await client.get(f"/api/users/{me.id}/", headers=other.headers)
    assert response.status == 404
    # The username is free again.
    response = await client.post("/api/users/", json={"username": me.username, "password": PASSWORD})
    assert response.status == 201
