"""NoSQL injection and cross-user access: operator-shaped input is refused, never run as a query."""

import base64
import secrets
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from tests.helpers import (
    PASSWORD,
    Account,
    create_training,
    get_training,
    register,
    sized_model,
    small_model,
    training_total,
    upload_model,
)

INVALID = "Invalid credentials."
OPERATOR = {"$ne": None}
ENCODED_OPERATOR = "%7B%22%24ne%22%3Anull%7D"  # {"$ne":null}


def basic(user: str, password: str) -> str:
    """A Basic Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def assert_error(response: Any, status: int) -> dict[str, Any]:
    """An error answer with the given status and the contract's JSON body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body["detail"], str), body
    return dict(body)


async def training_ids(client: TestClient, account: Account, path: str) -> set[str]:
    """The ids in one of the account's training lists (every item, one page)."""
    response = await client.get(path + ("&" if "?" in path else "?") + "limit=1000", headers=account.headers)
    assert response.status == 200, await response.text()
    return {item["id"] for item in await response.json()}


async def model_ids(client: TestClient, account: Account) -> set[str]:
    """The ids of the models the account lists."""
    response = await client.get("/api/models/", headers=account.headers)
    assert response.status == 200, await response.text()
    return {item["id"] for item in await response.json()}


async def user_count(client: TestClient, account: Account) -> int:
    """How many users the service has."""
    response = await client.get("/api/users/", headers=account.headers)
    assert response.status == 200, await response.text()
    return len(await response.json())


async def started_and_cancelled(client: TestClient, actor: Account, participant: Account) -> tuple[str, str]:
    """Two trainings of the actor with a participant: one in state I, one cancelled (state E)."""
    initial = await create_training(client, actor, clients=[participant.id])
    cancelled = await create_training(client, actor, clients=[participant.id])
    response = await client.post(f"/api/trainings/{cancelled}/cancel/", headers=actor.headers)
    assert response.status == 202, await response.text()
    return initial, cancelled


# --- query strings ----------------------------------------------------------------------------

QUERY_INJECTIONS = [
    "state[$ne]=I",
    "state=$gt",
    'state={"$ne":"I"}',
    "ordering[$gt]=",
    "limit[$gt]=0",
    "offset[$gt]=0",
    "state[]=I",
    "state=I,$ne",
    "state=I&state[$ne]=E",
    'aggregation_method={"$ne":null}',
    "uncertainty_method[$exists]=true",
    "ordering=$natural",
    'ordering={"$gt":""}',
    'limit={"$gt":0}',
    "$where=1",
    "actor[$ne]=x",
]


@pytest.mark.parametrize("path", ["/api/trainings/", "/api/users/trainings/"])
async def test_operator_shaped_query_strings_are_400_and_list_nothing(client: TestClient, path: str) -> None:
    me, other, participant = await register(client), await register(client), await register(client)
    mine = await started_and_cancelled(client, me, participant)
    theirs = await started_and_cancelled(client, other, participant)
    for query in QUERY_INJECTIONS:
        response = await client.get(f"{path}?{query}", headers=me.headers)
        assert response.status == 400, (query, await response.text())
        body = await assert_error(response, 400)
        assert "X-Total-Count" not in response.headers, query
        assert not any(training_id in str(body) for training_id in (*mine, *theirs)), (query, body)
    # The same list without an injected parameter answers exactly the caller's trainings.
    assert await training_ids(client, me, path) == set(mine)


async def test_another_actor_cannot_be_chosen_by_query(client: TestClient) -> None:
    me, other = await register(client), await register(client)
    theirs = await create_training(client, other)
    for query in (f"actor={other.id}", f"participants={other.id}", f"_id={theirs}", f"id={theirs}"):
        for path in ("/api/trainings/", "/api/users/trainings/"):
            body = await assert_error(await client.get(f"{path}?{query}", headers=me.headers), 400)
            assert theirs not in str(body)


# --- request bodies ---------------------------------------------------------------------------

CREATE_INJECTIONS: dict[str, tuple[str, Any]] = {
    "model_id gt": ("model_id", {"$gt": ""}),
    "model_id ne": ("model_id", OPERATOR),
    "model_id list": ("model_id", [{"$ne": None}]),
    "clients item gt": ("clients", [{"$gt": ""}]),
    "clients item ne": ("clients", [OPERATOR]),
    "clients object": ("clients", OPERATOR),
    "target operator": ("target_num_updates", {"$gt": 0}),
    "metric_names operator": ("metric_names", OPERATOR),
    "aggregation operator": ("aggregation_method", {"$in": ["FedAvg"]}),
    "top-level $where": ("$where", "sleep(1000)"),
    "top-level $set": ("$set", {"state": "O"}),
    "actor given": ("actor", OPERATOR),
}


@pytest.mark.parametrize(("field", "value"), CREATE_INJECTIONS.values(), ids=CREATE_INJECTIONS.keys())
async def test_operator_shaped_create_bodies_are_400_and_write_nothing(
    client: TestClient, field: str, value: Any
) -> None:
    me, other = await register(client), await register(client)
    model_id = await upload_model(client, me)
    models_before = await model_ids(client, me)
    body = {"model_id": model_id, "target_num_updates": 3, "clients": [other.id], field: value}
    await assert_error(await client.post("/api/trainings/", json=body, headers=me.headers), 400)
    assert await training_total(client, me) == 0
    assert await training_total(client, other, "/api/users/trainings/") == 0
    assert await model_ids(client, me) == models_before  # no clone made either


CLIENTS_INJECTIONS: dict[str, Any] = {
    "ne item": [OPERATOR],
    "gt item": [{"$gt": ""}],
    "in item": [{"$in": []}],
    "exists item": [{"$exists": True}],
    "operator after a real id": "REAL_THEN_OPERATOR",
    "object": OPERATOR,
    "string": "$ne",
    "null": None,
}


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize("clients", CLIENTS_INJECTIONS.values(), ids=CLIENTS_INJECTIONS.keys())
async def test_operator_shaped_clients_are_400_and_participants_unchanged(
    client: TestClient, method: str, clients: Any
) -> None:
    me = await register(client)
    first, second, outsider = await register(client), await register(client), await register(client)
    training_id = await create_training(client, me, clients=[first.id, second.id])
    before = await get_training(client, me, training_id)
    if clients == "REAL_THEN_OPERATOR":
        clients = [outsider.id if method == "PUT" else first.id, OPERATOR]
    response = await client.request(
        method, f"/api/trainings/{training_id}/clients/", json={"clients": clients}, headers=me.headers
    )
    await assert_error(response, 400)
    after = await get_training(client, me, training_id)
    assert after == before
    assert after["participants"] == [first.id, second.id]
    assert await training_total(client, outsider, "/api/users/trainings/") == 0


PATCH_INJECTIONS: dict[str, dict[str, Any]] = {
    "$set": {"$set": {"state": "O"}},
    "$inc": {"$inc": {"target_num_updates": 1}},
    "state": {"state": "O"},
    "actor": {"actor": OPERATOR},
    "participants": {"participants": [OPERATOR]},
    "target operator": {"target_num_updates": {"$inc": 1}},
    "options operator": {"options": {"$set": {"x": 1}}},
    "options dotted path": {"options": {"state.x": 1}},
}


@pytest.mark.parametrize("body", PATCH_INJECTIONS.values(), ids=PATCH_INJECTIONS.keys())
async def test_operator_shaped_patch_bodies_are_400_and_change_nothing(
    client: TestClient, body: dict[str, Any]
) -> None:
    me, participant = await register(client), await register(client)
    training_id = await create_training(client, me, clients=[participant.id])
    before = await client.get(f"/api/trainings/{training_id}/", headers=me.headers)
    await assert_error(
        await client.patch(f"/api/trainings/{training_id}/", json=body, headers=me.headers), 400
    )
    after = await client.get(f"/api/trainings/{training_id}/", headers=me.headers)
    assert await after.json() == await before.json()
    assert after.headers["ETag"] == before.headers["ETag"]


REGISTRATION_INJECTIONS: dict[str, dict[str, Any]] = {
    "username ne": {"username": OPERATOR},
    "username gt": {"username": {"$gt": ""}},
    "username regex": {"username": {"$regex": ".*"}},
    "username list": {"username": ["admin"]},
    "username empty list": {"username": []},
    "username $where": {"username": "$where"},
    "username quote trick": {"username": "admin' || '1'=='1"},
    "password ne": {"password": OPERATOR},
    "password gt": {"password": {"$gt": ""}},
    "password list": {"password": [PASSWORD]},
    "email operator": {"email": OPERATOR},
    "actor operator": {"actor": OPERATOR},
    "top-level $set": {"$set": {"actor": True}},
}


@pytest.mark.parametrize("changes", REGISTRATION_INJECTIONS.values(), ids=REGISTRATION_INJECTIONS.keys())
async def test_operator_shaped_registrations_are_400_and_create_nobody(
    client: TestClient, changes: dict[str, Any]
) -> None:
    admin = await register(client, "admin")
    before = await user_count(client, admin)
    response = await client.post(
        "/api/users/", json={"username": "newcomer", "password": PASSWORD, **changes}
    )
    await assert_error(response, 400)
    assert await user_count(client, admin) == before


# --- credentials ------------------------------------------------------------------------------

INJECTED_CREDENTIALS: dict[str, str] = {
    "basic user ne": basic('{"$ne": null}', PASSWORD),
    "basic user gt": basic('{"$gt": ""}', PASSWORD),
    "basic user quote trick": basic("admin' || '1'=='1", PASSWORD),
    "basic user quote trick no password": basic("admin' || '1'=='1", ""),
    "basic user regex": basic(".*", PASSWORD),
    "basic user with NUL": basic("admin\x00", PASSWORD),
    "basic password ne": basic("admin", '{"$ne": null}'),
    "basic password quote trick": basic("admin", "' || '1'=='1"),
    "basic token ne": basic('{"$ne": null}', ""),
    "token ne": 'Token {"$ne": null}',
    "token gt": 'Token {"$gt": ""}',
    "token quote trick": "Token ' || '1'=='1",
    "bearer regex": "Bearer .*",
}


@pytest.mark.parametrize("header", INJECTED_CREDENTIALS.values(), ids=INJECTED_CREDENTIALS.keys())
async def test_operator_shaped_credentials_are_401(client: TestClient, header: str) -> None:
    admin = await register(client, "admin")
    response = await client.get("/api/users/myself/", headers={"Authorization": header})
    assert await assert_error(response, 401) == {"detail": INVALID}
    assert response.headers.getall("WWW-Authenticate") == ["Token"]
    # A write with them does nothing.
    model_id = await upload_model(client, admin)
    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3},
        headers={"Authorization": header},
    )
    await assert_error(response, 401)
    assert await training_total(client, admin) == 0


BAD_CREDENTIALS: dict[str, Any] = {
    "unknown token": lambda a: "Token " + secrets.token_hex(20),
    "wrong password": lambda a: basic(a.username, PASSWORD + "!"),
    "password of another user": lambda a: basic("someone-else", PASSWORD),
    "bad base64": lambda a: (
        "Basic " + base64.b64encode(f"{a.username}:{PASSWORD}".encode()).decode()[:-2] + "!!"
    ),
    "base64 missing padding": lambda a: (
        "Basic " + base64.b64encode(f"{a.token}:".encode()).decode().rstrip("=")
    ),
    "missing scheme": lambda a: a.token,
    "missing scheme with space": lambda a: " " + a.token,
    "basic without base64": lambda a: f"Basic {a.username}:{PASSWORD}",
    "empty token": lambda a: "Token ",
    "empty bearer": lambda a: "Bearer ",
    "empty basic": lambda a: "Basic ",
    "token twice": lambda a: f"Token Token {a.token}",
    "token with inner space": lambda a: f"Token {a.token[:20]} {a.token[20:]}",
    "token with trailing word": lambda a: f"Token {a.token} extra",
    "token with NUL": lambda a: basic(a.token + "\x00", ""),
    "token with NUL inside": lambda a: basic(a.token[:20] + "\x00" + a.token[20:], ""),
    "user name with NUL": lambda a: basic(a.username + "\x00", PASSWORD),
    "password with NUL": lambda a: basic(a.username, PASSWORD + "\x00"),
    "token as password": lambda a: basic(a.username, a.token),
    "password as token": lambda a: f"Token {PASSWORD}",
}


@pytest.mark.parametrize("header", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
async def test_bad_credentials_are_401_and_do_nothing(client: TestClient, header: Any) -> None:
    me = await register(client)
    model_id = await upload_model(client, me)
    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3},
        headers={"Authorization": header(me)},
    )
    assert await assert_error(response, 401) == {"detail": INVALID}
    response = await client.delete("/api/users/myself/", headers={"Authorization": header(me)})
    await assert_error(response, 401)
    assert await training_total(client, me) == 0
    assert (await (await client.get("/api/users/myself/", headers=me.headers)).json())["id"] == me.id


async def test_credentials_of_a_deleted_user_are_401_even_after_the_name_is_taken_again(
    client: TestClient,
) -> None:
    gone = await register(client, "leaving")
    forms = [
        f"Token {gone.token}",
        f"Bearer {gone.token}",
        basic(gone.username, PASSWORD),
        basic(gone.token, ""),
    ]
    for header in forms:  # all work, and are remembered by the credential cache
        response = await client.get("/api/users/myself/", headers={"Authorization": header})
        assert response.status == 200, header
    assert (await client.delete("/api/users/myself/", headers=gone.headers)).status == 200
    for header in forms:
        response = await client.get("/api/trainings/", headers={"Authorization": header})
        assert await assert_error(response, 401) == {"detail": INVALID}, header

    response = await client.post("/api/users/", json={"username": "leaving", "password": "another password"})
    assert response.status == 201, await response.text()
    newcomer_id = (await response.json())["id"]
    assert newcomer_id != gone.id
    for header in forms:
        response = await client.get("/api/users/myself/", headers={"Authorization": header})
        assert await assert_error(response, 401) == {"detail": INVALID}, header
    response = await client.get(
        "/api/users/myself/", headers={"Authorization": basic("leaving", "another password")}
    )
    assert (await response.json())["id"] == newcomer_id


# --- path ids ---------------------------------------------------------------------------------

OPERATOR_IDS = [ENCODED_OPERATOR, "%24ne", "%7B%22%24gt%22%3A%22%22%7D", "%5B%24ne%5D", "$where", ".*"]
ID_ROUTES = [
    ("GET", "/api/trainings/{}/"),
    ("PATCH", "/api/trainings/{}/"),
    ("DELETE", "/api/trainings/{}/"),
    ("PUT", "/api/trainings/{}/clients/"),
    ("DELETE", "/api/trainings/{}/clients/"),
    ("POST", "/api/trainings/{}/start/"),
    ("POST", "/api/trainings/{}/cancel/"),
    ("GET", "/api/models/{}/"),
    ("GET", "/api/models/{}/metadata/"),
    ("DELETE", "/api/models/{}/"),
    ("GET", "/api/users/{}/"),
]


@pytest.mark.parametrize("bad_id", OPERATOR_IDS)
async def test_operator_shaped_path_ids_are_404_and_touch_nothing(client: TestClient, bad_id: str) -> None:
    me, participant = await register(client), await register(client)
    training_id = await create_training(client, me, clients=[participant.id])
    before = await get_training(client, me, training_id)
    models_before = await model_ids(client, me)
    for method, template in ID_ROUTES:
        body = {"clients": [participant.id]} if "clients" in template else {"target_num_updates": 9}
        response = await client.request(
            method,
            template.format(bad_id),
            json=body if method in {"PATCH", "PUT", "DELETE"} else None,
            headers=me.headers,
        )
        await assert_error(response, 404)
    assert await get_training(client, me, training_id) == before
    assert await model_ids(client, me) == models_before


# --- cross-user access ------------------------------------------------------------------------


async def other_users_training(client: TestClient) -> tuple[Account, Account, Account, str, str]:
    """Me, another actor and its participant, and the other actor's training and model."""
    me, other, participant = await register(client), await register(client), await register(client)
    model_id = await upload_model(client, other, sized_model(300))
    training_id = await create_training(client, other, model_id, clients=[participant.id])
    return me, other, participant, training_id, model_id


TRAINING_ACTIONS: dict[str, tuple[str, str, Any]] = {
    "read": ("GET", "", None),
    "patch": ("PATCH", "", {"target_num_updates": 99}),
    "patch options": ("PATCH", "", {"options": {"taken": True}}),
    "delete": ("DELETE", "", None),
    "add myself as client": ("PUT", "clients/", "ME"),
    "remove their client": ("DELETE", "clients/", "PARTICIPANT"),
    "start": ("POST", "start/", None),
    "cancel": ("POST", "cancel/", None),
}


@pytest.mark.parametrize(("method", "suffix", "body"), TRAINING_ACTIONS.values(), ids=TRAINING_ACTIONS.keys())
async def test_a_token_never_reaches_another_users_training(
    client: TestClient, method: str, suffix: str, body: Any
) -> None:
    me, other, participant, training_id, _ = await other_users_training(client)
    path = f"/api/trainings/{training_id}/"
    before = await client.get(path, headers=other.headers)
    if isinstance(body, str):
        body = {"clients": [me.id if body == "ME" else participant.id]}
    await assert_error(await client.request(method, path + suffix, json=body, headers=me.headers), 403)
    after = await client.get(path, headers=other.headers)
    assert await after.json() == await before.json()
    assert after.headers["ETag"] == before.headers["ETag"]
    assert await training_ids(client, me, "/api/users/trainings/") == set()


PARTICIPANT_ACTIONS = {key: value for key, value in TRAINING_ACTIONS.items() if key != "read"}


@pytest.mark.parametrize(
    ("method", "suffix", "body"), PARTICIPANT_ACTIONS.values(), ids=PARTICIPANT_ACTIONS.keys()
)
async def test_a_participant_reads_but_never_acts_as_the_actor(
    client: TestClient, method: str, suffix: str, body: Any
) -> None:
    _, other, participant, training_id, _ = await other_users_training(client)
    path = f"/api/trainings/{training_id}/"
    before = await client.get(path, headers=participant.headers)
    assert before.status == 200
    if isinstance(body, str):
        body = {"clients": [participant.id]}
    await assert_error(
        await client.request(method, path + suffix, json=body, headers=participant.headers), 403
    )
    after = await client.get(path, headers=other.headers)
    assert await after.json() == await before.json()
    assert after.headers["ETag"] == before.headers["ETag"]


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", "metadata/"), ("GET", ""), ("DELETE", "")],
    ids=["metadata", "download", "delete"],
)
async def test_a_token_never_reaches_another_users_model(
    client: TestClient, method: str, suffix: str
) -> None:
    me, other, _, training_id, model_id = await other_users_training(client)
    lone_model = await upload_model(client, other, sized_model(301))  # in no training at all
    for target in (model_id, lone_model):
        metadata_before = await (
            await client.get(f"/api/models/{target}/metadata/", headers=other.headers)
        ).json()
        response = await client.request(method, f"/api/models/{target}/{suffix}", headers=me.headers)
        body = await assert_error(response, 403)
        assert "their weights" not in str(body) and "other weights" not in str(body)
        response = await client.get(f"/api/models/{target}/metadata/", headers=other.headers)
        assert await response.json() == metadata_before
    download = await client.get(f"/api/models/{model_id}/", headers=other.headers)
    assert await download.read() == sized_model(300)
    assert (await get_training(client, other, training_id))["model"] == model_id


async def test_a_participant_cannot_delete_the_actors_model(client: TestClient) -> None:
    _, other, participant, training_id, model_id = await other_users_training(client)
    response = await client.get(f"/api/models/{model_id}/", headers=participant.headers)
    assert await response.read() == sized_model(300)
    await assert_error(await client.delete(f"/api/models/{model_id}/", headers=participant.headers), 403)
    assert (await get_training(client, other, training_id))["model"] == model_id
    assert model_id in await model_ids(client, other)


async def test_a_training_cannot_be_created_on_another_users_model(client: TestClient) -> None:
    me, other, _, _, model_id = await other_users_training(client)
    other_models = await model_ids(client, other)
    response = await client.post(
        "/api/trainings/", json={"model_id": model_id, "target_num_updates": 3}, headers=me.headers
    )
    await assert_error(response, 403)
    assert await training_total(client, me) == 0
    assert await model_ids(client, other) == other_models  # no clone for the intruder
    assert await model_ids(client, me) == set()


async def test_lists_hold_only_the_callers_own_items(client: TestClient) -> None:
    me, other, participant, their_training, their_model = await other_users_training(client)
    their_lone_model = await upload_model(client, other)
    my_model = await upload_model(client, me)
    my_training = await create_training(client, me, my_model, clients=[participant.id])
    my_second = await create_training(client, me)
    response = await client.post(f"/api/trainings/{my_second}/cancel/", headers=me.headers)
    assert response.status == 202

    every_state = "?state=I,O,C,E,S"
    for path in ("/api/trainings/", "/api/users/trainings/"):
        assert await training_ids(client, me, path) == {my_training, my_second}
        assert await training_ids(client, me, path + every_state) == {my_training, my_second}
        assert await training_total(client, me, path) == 2
    mine = await model_ids(client, me)
    assert my_model in mine and len(mine) == 2
    assert not mine & {their_model, their_lone_model}

    # The shared participant sees both actors' trainings only in its participant list.
    assert await training_ids(client, participant, "/api/users/trainings/") == {my_training, their_training}
    assert await training_ids(client, participant, "/api/trainings/") == set()
    # And the other actor sees none of mine.
    assert await training_ids(client, other, "/api/users/trainings/") == {their_training}
    assert my_model not in await model_ids(client, other)


@pytest.mark.parametrize("shape", ['{"$ne": null}', '[{"$gt": 0}]', '{"$where": "1"}', "[1, [2]]"])
async def test_operator_shaped_input_shapes_are_400_and_store_no_model(
    client: TestClient, shape: str
) -> None:
    me = await register(client)
    form = FormData()
    form.add_field("name", "model")
    form.add_field("input_shape", shape)
    form.add_field("model_file", small_model(), filename="model.pt", content_type="application/octet-stream")
    await assert_error(await client.post("/api/models/", data=form, headers=me.headers), 400)
    assert await model_ids(client, me) == set()
