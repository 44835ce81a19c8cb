"""Trainings: creation and its validation, daisy chaining, model cloning, reading, deletion, cascades."""

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiohttp.test_utils import TestClient

from tests.helpers import (
    create_training,
    get_training,
    register,
    sized_model,
    stored_training,
    training_total,
    update_stored_training,
    upload_model,
)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRAINING_KEYS = {
    "id",
    "model",
    "actor",
    "participants",
    "state",
    "target_num_updates",
    "last_update",
    "created_at",
    "uncertainty_method",
    "aggregation_method",
    "options",
    "metric_names",
    "locked",
    "state_detail",
    "round",
    "phase",
    "round_deadline",
}
DETAIL_KEYS = TRAINING_KEYS | {"local_models_arrived", "local_models_expected"}
MISSING = object()
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
MIB = 1024 * 1024


def nest(levels: int) -> dict[str, Any]:
    """A chain of `levels` nested objects: nest(1) == {"leaf": 1}, nest(2) == {"n": {"leaf": 1}}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


async def test_create_answers_201_with_location_and_applies_defaults(
    client: TestClient, database_url: str
) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post(
        "/api/trainings/", json={"model_id": model_id, "target_num_updates": 7}, headers=actor.headers
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    training_id = body["training_id"]
    assert body == {"detail": "Training created successfully!", "training_id": training_id}
    assert str(UUID(training_id)) == training_id
    assert response.headers["Location"] == f"/api/trainings/{training_id}/"

    located = await client.get(response.headers["Location"], headers=actor.headers)
    assert located.status == 200
    assert located.headers["Content-Type"].startswith("application/json")
    training = await located.json()
    assert set(training) == DETAIL_KEYS
    assert {key: value for key, value in training.items() if key not in {"last_update", "created_at"}} == {
        "id": training_id,
        "model": model_id,
        "actor": actor.id,
        "participants": [],
        "state": "I",
        "target_num_updates": 7,
        "uncertainty_method": "NONE",
        "aggregation_method": "FedAvg",
        "options": {},
        "metric_names": [],
        "locked": False,
        "state_detail": None,
        "round": 0,
        "phase": None,
        "round_deadline": None,
        "local_models_arrived": 0,
        "local_models_expected": 0,
    }
    assert ISO_Z.match(training["created_at"]), training["created_at"]
    assert ISO_Z.match(training["last_update"]), training["last_update"]

    stored = await stored_training(database_url, training_id)
    assert stored is not None
    assert stored["_id"] == UUID(training_id)
    assert stored["model"] == UUID(model_id)
    assert stored["actor"] == UUID(actor.id)
    assert stored["participants"] == []
    assert (stored["state"], stored["aggregation_method"], stored["uncertainty_method"]) == (
        "I",
        "FedAvg",
        "NONE",
    )
    assert stored["target_num_updates"] == 7
    assert stored["options"] == {} and stored["metric_names"] == []
    assert stored["locked"] is False and stored["state_detail"] is None
    assert isinstance(stored["created_at"], datetime) and isinstance(stored["last_update"], datetime)


async def test_create_keeps_every_given_field_and_options_exactly_as_sent(
    client: TestClient, database_url: str
) -> None:
    actor = await register(client)
    first, second = await register(client), await register(client)
    options = {
        "lr": 0.01,
        "batch": 32,
        "big": 2**53,
        "flag": False,
        "nothing": None,
        "name": "grüße ☃",
        "a$b": "dollar inside a key is fine",
        "nested": {"deep": [1, {"x": None, "y": [[], {}]}], "empty": {}},
        "uncertainty": {"N": 3, "extra": "kept"},
        "skip_model_tests": True,
        "daisy_chain_period": 0,
    }
    training_id = await create_training(
        client,
        actor,
        target_num_updates=12,
        metric_names=["accuracy", "loss"],
        aggregation_method="FedProx",
        uncertainty_method="SWAG",
        options=options,
        clients=[first.id, second.id, first.id],
    )
    training = await get_training(client, actor, training_id)
    assert training["options"] == options
    assert "softmax" not in training["options"]["uncertainty"]  # no defaults filled in
    assert training["metric_names"] == ["accuracy", "loss"]
    assert training["aggregation_method"] == "FedProx"
    assert training["uncertainty_method"] == "SWAG"
    assert training["target_num_updates"] == 12
    assert training["participants"] == [first.id, second.id]
    assert training["local_models_expected"] == 2
    stored = await stored_training(database_url, training_id)
    assert stored is not None
    assert stored["options"] == options
    assert stored["participants"] == [UUID(first.id), UUID(second.id)]
    assert (stored["aggregation_method"], stored["uncertainty_method"]) == ("FedProx", "SWAG")


@pytest.mark.parametrize("target", [1, 1_000_000])
async def test_create_accepts_the_target_bounds(client: TestClient, target: int) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor, target_num_updates=target)
    assert (await get_training(client, actor, training_id))["target_num_updates"] == target


BAD_CREATE_BODIES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown key": ({"extra": 1}, "extra"),
    "seed key that is not an input": ({"state": "O"}, "state"),
    "target missing": ({"target_num_updates": MISSING}, "target_num_updates"),
    "target string": ({"target_num_updates": "5"}, "target_num_updates"),
    "target float": ({"target_num_updates": 5.0}, "target_num_updates"),
    "target fractional": ({"target_num_updates": 1.5}, "target_num_updates"),
    "target bool": ({"target_num_updates": True}, "target_num_updates"),
    "target null": ({"target_num_updates": None}, "target_num_updates"),
    "target zero": ({"target_num_updates": 0}, "target_num_updates"),
    "target negative": ({"target_num_updates": -3}, "target_num_updates"),
    "target too large": ({"target_num_updates": 1_000_001}, "target_num_updates"),
    "model_id missing": ({"model_id": MISSING}, "model_id"),
    "model_id not a uuid": ({"model_id": "not-a-uuid"}, "model_id"),
    "model_id number": ({"model_id": 5}, "model_id"),
    "aggregation lower case": ({"aggregation_method": "fedavg"}, "aggregation_method"),
    "aggregation unknown": ({"aggregation_method": "FedSGD"}, "aggregation_method"),
    "uncertainty lower case": ({"uncertainty_method": "none"}, "uncertainty_method"),
    "uncertainty unknown": ({"uncertainty_method": "BAYES"}, "uncertainty_method"),
    "metric_names string": ({"metric_names": "accuracy"}, "metric_names"),
    "metric_names numbers": ({"metric_names": [1]}, "metric_names"),
    "options list": ({"options": [1]}, "options"),
    "options string": ({"options": "{}"}, "options"),
    "clients not uuids": ({"clients": ["nope"]}, "clients"),
    "clients string": ({"clients": "nope"}, "clients"),
}


@pytest.mark.parametrize(("changes", "field"), BAD_CREATE_BODIES.values(), ids=BAD_CREATE_BODIES.keys())
async def test_create_rejects_bad_bodies_and_writes_nothing(
    client: TestClient, changes: dict[str, Any], field: str
) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    body = {"model_id": model_id, "target_num_updates": 3, **changes}
    body = {key: value for key, value in body.items() if value is not MISSING}
    response = await client.post("/api/trainings/", json=body, headers=actor.headers)
    assert response.status == 400, await response.text()
    error = await response.json()
    assert isinstance(error["detail"], str)
    assert any(item["loc"][0] == field for item in error["errors"]), error
    assert await training_total(client, actor) == 0


async def test_create_rejects_bodies_that_are_not_json_objects(client: TestClient) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    for raw in [
        b"{not json",
        b"[]",
        b'"text"',
        b"",
        b'{"model_id": "%s", "target_num_updates": NaN}' % model_id.encode(),
    ]:
        response = await client.post(
            "/api/trainings/", data=raw, headers={**actor.headers, "Content-Type": "application/json"}
        )
        assert response.status == 400, raw
        assert "detail" in await response.json()
    response = await client.post(
        "/api/trainings/",
        data=f'{{"model_id": "{model_id}", "target_num_updates": 3}}',
        headers={**actor.headers, "Content-Type": "text/plain"},
    )
    assert response.status == 415
    assert "detail" in await response.json()
    assert await training_total(client, actor) == 0


async def test_create_rejects_bodies_over_the_size_limit(client: TestClient) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    head = b'{"model_id": "%s", "target_num_updates": 3, "options": {"blob": "' % model_id.encode()

    async def chunked() -> AsyncIterator[bytes]:
        yield head
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}}'

    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3, "options": {"blob": "x" * MIB}},
        headers=actor.headers,
    )
    assert response.status == 413
    assert "detail" in await response.json()
    response = await client.post(
        "/api/trainings/", data=chunked(), headers={**actor.headers, "Content-Type": "application/json"}
    )
    assert response.status == 413
    assert "detail" in await response.json()
    assert await training_total(client, actor) == 0


async def test_create_needs_the_model_owner_and_an_existing_model(client: TestClient) -> None:
    owner, other = await register(client), await register(client)
    model_id = await upload_model(client, owner)
    response = await client.post(
        "/api/trainings/", json={"model_id": model_id, "target_num_updates": 3}, headers=other.headers
    )
    assert response.status == 403
    assert "detail" in await response.json()
    response = await client.post(
        "/api/trainings/", json={"model_id": str(uuid4()), "target_num_updates": 3}, headers=owner.headers
    )
    assert response.status == 400
    assert "detail" in await response.json()
    response = await client.post("/api/trainings/", json={"model_id": model_id, "target_num_updates": 3})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Token"
    assert await training_total(client, owner) == 0
    assert await training_total(client, other) == 0
    response = await client.get("/api/models/", headers=owner.headers)
    assert [model["id"] for model in await response.json()] == [model_id]  # no clone was made
    # The rejected attempts left the model free: the first real training gets the model itself.
    training_id = await create_training(client, owner, model_id)
    assert (await get_training(client, owner, training_id))["model"] == model_id


async def test_create_with_any_unknown_client_is_400_and_writes_nothing(client: TestClient) -> None:
    actor, known = await register(client), await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3, "clients": [known.id, str(uuid4())]},
        headers=actor.headers,
    )
    assert response.status == 400
    assert (await response.json())["detail"] == "Not all provided users were found!"
    assert await training_total(client, actor) == 0
    assert await training_total(client, known, "/api/users/trainings/") == 0
    training_id = await create_training(client, actor, model_id, clients=[known.id])
    assert (await get_training(client, actor, training_id))["model"] == model_id


BAD_OPTION_KEYS: dict[str, tuple[dict[str, Any], list[str | int]]] = {
    "dollar top level": ({"$where": "1"}, ["options", "$where"]),
    "dot top level": ({"a.b": 1}, ["options", "a.b"]),
    "nul top level": ({"a\x00b": 1}, ["options", "a\x00b"]),
    "dollar in object": ({"outer": {"$set": {"state": "C"}}}, ["options", "outer", "$set"]),
    "dot in object": ({"outer": {"inner": {"x.y": 1}}}, ["options", "outer", "inner", "x.y"]),
    "nul in object": ({"outer": {"\x00": 1}}, ["options", "outer", "\x00"]),
    "dollar in list": ({"steps": [1, {"$gt": 1}]}, ["options", "steps", 1, "$gt"]),
    "dot in nested list": ({"steps": [[{"a.b": 1}]]}, ["options", "steps", 0, 0, "a.b"]),
    "dollar in typed key": ({"uncertainty": {"N": 2, "$inc": 1}}, ["options", "uncertainty", "$inc"]),
}


BAD_TYPED_OPTIONS: dict[str, tuple[dict[str, Any], list[str | int]]] = {
    "period string": ({"daisy_chain_period": "5"}, ["options", "daisy_chain_period"]),
    "period negative": ({"daisy_chain_period": -1}, ["options", "daisy_chain_period"]),
    "period fractional": ({"daisy_chain_period": 1.5}, ["options", "daisy_chain_period"]),
    "period bool": ({"daisy_chain_period": True}, ["options", "daisy_chain_period"]),
    "period overflowing the target": ({"daisy_chain_period": 2**50}, ["options", "daisy_chain_period"]),
    "uncertainty N zero": ({"uncertainty": {"N": 0}}, ["options", "uncertainty", "N"]),
    "uncertainty N string": ({"uncertainty": {"N": "3"}}, ["options", "uncertainty", "N"]),
    "uncertainty N above 1000": ({"uncertainty": {"N": 1001}}, ["options", "uncertainty", "N"]),
    "uncertainty seed negative": ({"uncertainty": {"seed": -1}}, ["options", "uncertainty", "seed"]),
    "uncertainty softmax string": (
        {"uncertainty": {"softmax": "yes"}},
        ["options", "uncertainty", "softmax"],
    ),
    "uncertainty not an object": ({"uncertainty": 3}, ["options", "uncertainty"]),
    "skip_model_tests string": ({"skip_model_tests": "yes"}, ["options", "skip_model_tests"]),
    "skip_model_tests number": ({"skip_model_tests": 1}, ["options", "skip_model_tests"]),
    "integer beyond 64 bits": ({"seed": 2**64}, ["options", "seed"]),
}


BAD_OPTIONS = {**BAD_OPTION_KEYS, **BAD_TYPED_OPTIONS}


@pytest.mark.parametrize(("options", "loc"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
async def test_create_rejects_bad_options_and_writes_nothing(
    client: TestClient, options: dict[str, Any], loc: list[str | int]
) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post(
        "/api/trainings/",
        json={"model_id": model_id, "target_num_updates": 3, "options": options},
        headers=actor.headers,
    )
    assert response.status == 400, await response.text()
    error = await response.json()
    assert loc in [item["loc"] for item in error["errors"]], error
    assert await training_total(client, actor) == 0


async def test_options_nesting_is_limited_to_eight_levels(client: TestClient) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    for options in [{"n": nest(8)}, {"l": [[[[[[[[1]]]]]]]]}, {"n": {"l": [nest(7)]}}]:
        response = await client.post(
            "/api/trainings/",
            json={"model_id": model_id, "target_num_updates": 3, "options": options},
            headers=actor.headers,
        )
        assert response.status == 400, options
        assert (await response.json())["errors"], options
    assert await training_total(client, actor) == 0
    training_id = await create_training(client, actor, model_id, options=nest(8))
    assert (await get_training(client, actor, training_id))["options"] == nest(8)


async def test_daisy_chain_multiplies_the_target_once_at_creation(
    client: TestClient, database_url: str
) -> None:
    actor, participant = await register(client), await register(client)
    chained = await create_training(
        client, actor, target_num_updates=42, options={"daisy_chain_period": 5}, clients=[participant.id]
    )
    zero = await create_training(client, actor, target_num_updates=42, options={"daisy_chain_period": 0})
    absent = await create_training(client, actor, target_num_updates=42)
    assert (await get_training(client, actor, chained))["target_num_updates"] == 210
    assert (await get_training(client, actor, zero))["target_num_updates"] == 42
    assert (await get_training(client, actor, absent))["target_num_updates"] == 42
    largest = await create_training(
        client, actor, target_num_updates=1_000_000, options={"daisy_chain_period": 1_000_000}
    )
    assert (await get_training(client, actor, largest))["target_num_updates"] == 10**12
    stored = await stored_training(database_url, chained)
    assert stored is not None and stored["target_num_updates"] == 210
    # Later writes that do not set the target never apply the rule again.
    response = await client.patch(
        f"/api/trainings/{chained}/", json={"metric_names": ["acc"]}, headers=actor.headers
    )
    assert response.status == 200
    assert (await response.json())["target_num_updates"] == 210
    response = await client.post(f"/api/trainings/{chained}/start/", headers=actor.headers)
    assert response.status == 202
    assert (await get_training(client, actor, chained))["target_num_updates"] == 210


async def test_patch_applies_the_daisy_chain_rule(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(
        client, actor, target_num_updates=42, options={"daisy_chain_period": 5}
    )
    url = f"/api/trainings/{training_id}/"

    async def patch(body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = await client.patch(url, json=body, headers=actor.headers)
        assert response.status == status, (body, await response.text())
        return dict(await response.json())

    assert (await patch({"target_num_updates": 10}))["target_num_updates"] == 50
    await patch({"options": {"daisy_chain_period": 3}}, 400)
    await patch({"options": {}}, 400)
    await patch({"options": {"lr": 0.1}}, 400)
    training = await get_training(client, actor, training_id)
    assert (training["target_num_updates"], training["options"]) == (50, {"daisy_chain_period": 5})
    # Keeping the period while replacing the other options needs no target.
    training = await patch({"options": {"daisy_chain_period": 5, "lr": 0.1}})
    assert (training["target_num_updates"], training["options"]) == (50, {"daisy_chain_period": 5, "lr": 0.1})
    training = await patch({"options": {"daisy_chain_period": 3}, "target_num_updates": 10})
    assert (training["target_num_updates"], training["options"]) == (30, {"daisy_chain_period": 3})
    assert (await patch({"target_num_updates": 7}))["target_num_updates"] == 21
    training = await patch({"options": {"daisy_chain_period": 0}, "target_num_updates": 10})
    assert (training["target_num_updates"], training["options"]) == (10, {"daisy_chain_period": 0})
    assert (await patch({"target_num_updates": 4}))["target_num_updates"] == 4
    assert (await get_training(client, actor, training_id))["target_num_updates"] == 4

    plain = await create_training(client, actor, target_num_updates=42)
    response = await client.patch(
        f"/api/trainings/{plain}/", json={"target_num_updates": 9}, headers=actor.headers
    )
    assert (await response.json())["target_num_updates"] == 9
    response = await client.patch(
        f"/api/trainings/{plain}/",
        json={"options": {"daisy_chain_period": 2}, "target_num_updates": 9},
        headers=actor.headers,
    )
    assert (await response.json())["target_num_updates"] == 18


async def test_a_model_already_in_a_training_is_cloned_for_the_next(client: TestClient) -> None:
    actor = await register(client)
    content = sized_model(9000)
    model_id = await upload_model(client, actor, content)
    first = await create_training(client, actor, model_id)
    second = await create_training(client, actor, model_id)
    first_training = await get_training(client, actor, first)
    second_training = await get_training(client, actor, second)
    assert first_training["model"] == model_id
    clone_id = second_training["model"]
    assert clone_id != model_id
    assert str(UUID(clone_id)) == clone_id

    original = await (await client.get(f"/api/models/{model_id}/metadata/", headers=actor.headers)).json()
    response = await client.get(f"/api/models/{clone_id}/metadata/", headers=actor.headers)
    assert response.status == 200
    clone = await response.json()
    assert clone["id"] == clone_id
    assert (clone["owner"], clone["sha256"], clone["size"]) == (actor.id, original["sha256"], len(content))
    assert original["size"] == len(content)
    download = await client.get(f"/api/models/{clone_id}/", headers=actor.headers)
    assert download.status == 200
    assert await download.read() == content
    assert await training_total(client, actor) == 2

    # Deleting the clone's training leaves the original's training and bytes alone.
    response = await client.delete(f"/api/models/{clone_id}/", headers=actor.headers)
    assert response.status == 200
    assert (await client.get(f"/api/trainings/{second}/", headers=actor.headers)).status == 404
    assert (await get_training(client, actor, first))["model"] == model_id
    download = await client.get(f"/api/models/{model_id}/", headers=actor.headers)
    assert await download.read() == content


async def test_get_shows_a_training_to_its_actor_and_participants_only(client: TestClient) -> None:
    actor = await register(client)
    first, second, stranger = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[first.id, second.id])
    url = f"/api/trainings/{training_id}/"

    for account in (actor, first, second):
        response = await client.get(url, headers=account.headers)
        assert response.status == 200
        etag = response.headers["ETag"]
        assert re.fullmatch(r'(W/)?"[^"]+"', etag), etag
        training = await response.json()
        assert training["id"] == training_id
        assert training["local_models_arrived"] == 0
        assert training["local_models_expected"] == 2
        assert ISO_Z.match(training["created_at"]) and ISO_Z.match(training["last_update"])

    response = await client.get(url, headers=stranger.headers)
    assert response.status == 403
    assert "detail" in await response.json()
    response = await client.get(url)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Token"
    assert await response.json() == {"detail": "Authentication credentials were not provided."}
    response = await client.get(url, headers={"Authorization": "Token wrong"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Token"
    assert await response.json() == {"detail": "Invalid credentials."}
    for missing in (str(uuid4()), "not-a-uuid", "12345"):
        response = await client.get(f"/api/trainings/{missing}/", headers=actor.headers)
        assert response.status == 404, missing
        assert "detail" in await response.json()
    response = await client.get(f"/api/trainings/{uuid4()}/", headers=stranger.headers)
    assert response.status == 404


async def test_every_training_endpoint_needs_credentials(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    calls = [
        ("POST", "/api/trainings/"),
        ("GET", "/api/trainings/"),
        ("GET", f"/api/trainings/{training_id}/"),
        ("PATCH", f"/api/trainings/{training_id}/"),
        ("DELETE", f"/api/trainings/{training_id}/"),
        ("PUT", f"/api/trainings/{training_id}/clients/"),
        ("DELETE", f"/api/trainings/{training_id}/clients/"),
        ("POST", f"/api/trainings/{training_id}/start/"),
        ("POST", f"/api/trainings/{training_id}/cancel/"),
        ("GET", "/api/users/trainings/"),
    ]
    for method, path in calls:
        response = await client.request(method, path, json={"clients": [actor.id]})
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Token"
    training = await get_training(client, actor, training_id)
    assert (training["state"], training["participants"]) == ("I", [])
    for method, path in calls[2:-1]:
        for bad_id in ("not-a-uuid", str(uuid4())):
            body = {"metric_names": []} if method == "PATCH" else {"clients": [actor.id]}
            response = await client.request(
                method, path.replace(training_id, bad_id), json=body, headers=actor.headers
            )
            assert response.status == 404, (method, path, bad_id)
            assert "detail" in await response.json()
    for method, path in [
        ("POST", f"/api/trainings/{training_id}/"),
        ("GET", f"/api/trainings/{training_id}/start/"),
        ("PUT", "/api/trainings/"),
        ("POST", f"/api/trainings/{training_id}/clients/"),
    ]:
        response = await client.request(method, path, headers=actor.headers)
        assert response.status == 405, (method, path)
        assert "detail" in await response.json()


async def test_every_training_path_works_without_a_trailing_slash(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post(
        "/api/trainings", json={"model_id": model_id, "target_num_updates": 2}, headers=actor.headers
    )
    assert response.status == 201
    training_id = (await response.json())["training_id"]
    url = f"/api/trainings/{training_id}"

    response = await client.get("/api/trainings", headers=actor.headers)
    assert response.status == 200 and [t["id"] for t in await response.json()] == [training_id]
    response = await client.get(url, headers=actor.headers)
    assert response.status == 200 and (await response.json())["id"] == training_id
    response = await client.patch(url, json={"metric_names": ["acc"]}, headers=actor.headers)
    assert response.status == 200 and (await response.json())["metric_names"] == ["acc"]
    response = await client.put(url + "/clients", json={"clients": [participant.id]}, headers=actor.headers)
    assert response.status == 202
    response = await client.delete(
        url + "/clients", json={"clients": [participant.id]}, headers=actor.headers
    )
    assert response.status == 200
    response = await client.put(url + "/clients", json={"clients": [participant.id]}, headers=actor.headers)
    assert response.status == 202
    response = await client.get("/api/users/trainings", headers=participant.headers)
    assert response.status == 200 and [t["id"] for t in await response.json()] == [training_id]
    response = await client.post(url + "/start", headers=actor.headers)
    assert response.status == 202
    response = await client.post(url + "/cancel", headers=actor.headers)
    assert response.status == 202
    assert (await get_training(client, actor, training_id))["state"] == "E"
    response = await client.delete(url, headers=actor.headers)
    assert response.status == 200
    assert (await client.get(url, headers=actor.headers)).status == 404


async def test_delete_removes_the_training_but_keeps_its_model(client: TestClient) -> None:
    actor, participant, stranger = await register(client), await register(client), await register(client)
    model_id = await upload_model(client, actor)
    training_id = await create_training(client, actor, model_id, clients=[participant.id])
    url = f"/api/trainings/{training_id}/"
    for account in (participant, stranger):
        response = await client.delete(url, headers=account.headers)
        assert response.status == 403
        assert "detail" in await response.json()
    assert (await get_training(client, actor, training_id))["id"] == training_id

    response = await client.delete(url, headers=actor.headers)
    assert response.status == 200
    assert await response.json() == {"detail": "Training removed!"}
    assert (await client.get(url, headers=actor.headers)).status == 404
    assert await training_total(client, actor) == 0
    assert await training_total(client, participant, "/api/users/trainings/") == 0
    response = await client.get(f"/api/models/{model_id}/metadata/", headers=actor.headers)
    assert response.status == 200
    assert (await response.json())["id"] == model_id
    response = await client.delete(url, headers=actor.headers)
    assert response.status == 404
    response = await client.delete(f"/api/trainings/{uuid4()}/", headers=actor.headers)
    assert response.status == 404
    # The freed model is not in a training any more: a new training gets it, not a clone.
    again = await create_training(client, actor, model_id)
    assert (await get_training(client, actor, again))["model"] == model_id


async def test_deleting_a_model_deletes_its_training(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    model_id = await upload_model(client, actor)
    training_id = await create_training(client, actor, model_id, clients=[participant.id])
    other = await create_training(client, actor)
    response = await client.delete(f"/api/models/{model_id}/", headers=actor.headers)
    assert response.status == 200
    for account in (actor, participant):
        assert (await client.get(f"/api/trainings/{training_id}/", headers=account.headers)).status == 404
    assert await training_total(client, participant, "/api/users/trainings/") == 0
    assert (await get_training(client, actor, other))["id"] == other


async def test_deleting_a_user_deletes_its_trainings_and_its_participations(
    client: TestClient, database_url: str
) -> None:
    leaving, staying, third = await register(client), await register(client), await register(client)
    own = await create_training(client, leaving, clients=[staying.id])
    joined = await create_training(client, staying, clients=[leaving.id, third.id])
    await update_stored_training(database_url, joined, last_update=LONG_AGO)
    response = await client.delete("/api/users/myself/", headers=leaving.headers)
    assert response.status == 200
    assert (await client.get(f"/api/trainings/{own}/", headers=staying.headers)).status == 404
    assert await training_total(client, staying, "/api/users/trainings/") == 1
    training = await get_training(client, staying, joined)
    assert training["participants"] == [third.id]
    assert training["local_models_expected"] == 1
    assert training["last_update"] > "2001"
    response = await client.get(f"/api/trainings/{joined}/", headers=leaving.headers)
    assert response.status == 401
    # A training whose only participant left cannot start.
    lonely = await create_training(client, staying, clients=[third.id])
    assert (await client.delete("/api/users/myself/", headers=third.headers)).status == 200
    response = await client.post(f"/api/trainings/{lonely}/start/", headers=staying.headers)
    assert response.status == 409
    assert await response.json() == {"detail": "At least one participant must be registered!"}
