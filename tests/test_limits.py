"""Limits not covered elsewhere: each answers 400 and writes nothing."""

import uuid

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from tests.helpers import get_training, register, small_model, training_total, upload_model


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clients", [str(uuid.uuid4()) for _ in range(1001)]),
        ("metric_names", [f"m{i}" for i in range(101)]),
        ("metric_names", ["x" * 65]),
        ("metric_names", [""]),
    ],
    ids=["1001 clients", "101 metric names", "65-character metric name", "empty metric name"],
)
async def test_create_limits(client: TestClient, field: str, value: list[str]) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    body = {"model_id": model_id, "target_num_updates": 3, field: value}
    response = await client.post("/api/trainings/", json=body, headers=actor.headers)
    assert response.status == 400, await response.text()
    assert any(item["loc"][0] == field for item in (await response.json())["errors"])
    assert await training_total(client, actor) == 0


async def test_one_thousand_clients_in_one_request_are_accepted(client: TestClient) -> None:
    actor = await register(client)
    other = await register(client)
    model_id = await upload_model(client, actor)
    body = {"model_id": model_id, "target_num_updates": 3, "clients": [other.id] * 1000}
    response = await client.post("/api/trainings/", json=body, headers=actor.headers)
    assert response.status == 201, await response.text()
    training = await get_training(client, actor, (await response.json())["training_id"])
    assert training["participants"] == [other.id]


async def test_one_thousand_distinct_unknown_clients_are_400_and_write_nothing(client: TestClient) -> None:
    # The embedded store cannot compile a `$in` of more than ~450 values: the ids are counted in pieces.
    actor = await register(client)
    other = await register(client)
    model_id = await upload_model(client, actor)
    ids = [other.id, *(str(uuid.uuid4()) for _ in range(999))]
    body = {"model_id": model_id, "target_num_updates": 3, "clients": ids}
    response = await client.post("/api/trainings/", json=body, headers=actor.headers)
    assert response.status == 400, await response.text()
    assert (await response.json())["detail"] == "Not all provided users were found!"
    assert await training_total(client, actor) == 0
    response = await client.post("/api/trainings/", json={"model_id": model_id, "target_num_updates": 3},
                                 headers=actor.headers)
    training_id = (await response.json())["training_id"]
    response = await client.put(f"/api/trainings/{training_id}/clients/", json={"clients": ids}, headers=actor.headers)
    assert response.status == 400, await response.text()
    assert (await get_training(client, actor, training_id))["participants"] == []


async def test_clients_counted_in_pieces_are_all_found(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fltraining.storage.queries.IN_CHUNK", 1)  # every id in its own `$in`
    actor = await register(client)
    others = [await register(client) for _ in range(3)]
    model_id = await upload_model(client, actor)
    body = {"model_id": model_id, "target_num_updates": 3, "clients": [other.id for other in others]}
    response = await client.post("/api/trainings/", json=body, headers=actor.headers)
    assert response.status == 201, await response.text()
    training = await get_training(client, actor, (await response.json())["training_id"])
    assert training["participants"] == [other.id for other in others]


async def test_clients_put_limit(client: TestClient) -> None:
    actor = await register(client)
    model_id = await upload_model(client, actor)
    response = await client.post("/api/trainings/", json={"model_id": model_id, "target_num_updates": 3},
                                 headers=actor.headers)
    training_id = (await response.json())["training_id"]
    ids = [str(uuid.uuid4()) for _ in range(1001)]
    response = await client.put(f"/api/trainings/{training_id}/clients/", json={"clients": ids}, headers=actor.headers)
    assert response.status == 400
    assert (await get_training(client, actor, training_id))["participants"] == []


async def test_password_longer_than_1024_characters_is_rejected(client: TestClient) -> None:
    response = await client.post("/api/users/", json={"username": "long", "password": "p" * 1025})
    assert response.status == 400
    response = await client.post("/api/users/", json={"username": "long", "password": "p" * 1024})
    assert response.status == 201


async def test_multipart_text_field_over_64_kib_is_rejected(client: TestClient) -> None:
    owner = await register(client)
    form = FormData()
    form.add_field("name", "m")
    form.add_field("description", "d" * (64 * 1024 + 1))
    form.add_field("model_file", small_model(), filename="m.pt", content_type="application/octet-stream")
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 400
    response = await client.get("/api/models/", headers=owner.headers)
    assert await response.json() == []
