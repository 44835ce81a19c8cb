"""Concurrent requests: no lost participant, one winner per start, no model shared by two trainings."""

import asyncio
from collections import Counter

from aiohttp.test_utils import TestClient

from tests.helpers import create_training, get_training, register, sized_model, training_total, upload_model


async def test_concurrent_client_registrations_all_land(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    users = await asyncio.gather(*(register(client) for _ in range(50)))
    url = f"/api/trainings/{training_id}/clients/"

    async def put(user_id: str) -> int:
        response = await client.put(url, json={"clients": [user_id]}, headers=actor.headers)
        return response.status

    statuses = await asyncio.gather(*(put(user.id) for user in users))
    assert statuses == [202] * 50
    training = await get_training(client, actor, training_id)
    assert sorted(training["participants"]) == sorted(user.id for user in users)
    assert training["local_models_expected"] == 50


async def test_concurrent_starts_have_one_winner(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[participant.id])

    async def start() -> int:
        response = await client.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
        return response.status

    statuses = Counter(await asyncio.gather(*(start() for _ in range(20))))
    assert statuses == Counter({202: 1, 409: 19})
    assert (await get_training(client, actor, training_id))["state"] == "O"


async def test_concurrent_creations_on_one_model_never_share_it(client: TestClient) -> None:
    actor = await register(client)
    content = sized_model(500)
    model_id = await upload_model(client, actor, content)

    async def create() -> str:
        response = await client.post(
            "/api/trainings/", json={"model_id": model_id, "target_num_updates": 5}, headers=actor.headers
        )
        assert response.status == 201, await response.text()
        return str((await response.json())["training_id"])

    training_ids = await asyncio.gather(*(create() for _ in range(20)))
    assert len(set(training_ids)) == 20
    assert await training_total(client, actor) == 20
    trainings = [await get_training(client, actor, training_id) for training_id in training_ids]
    models = [training["model"] for training in trainings]
    assert len(set(models)) == 20
    assert models.count(model_id) == 1
    for clone_id in set(models) - {model_id}:
        response = await client.get(f"/api/models/{clone_id}/metadata/", headers=actor.headers)
        assert response.status == 200
        metadata = await response.json()
        assert (metadata["owner"], metadata["size"]) == (actor.id, len(content))
    response = await client.get("/api/models/", headers=actor.headers)
    assert sorted(model["id"] for model in await response.json()) == sorted(models)


async def test_concurrent_patches_with_one_etag_have_one_winner(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/"
    etag = (await client.get(url, headers=actor.headers)).headers["ETag"]

    async def patch(target: int) -> tuple[int, int]:
        response = await client.patch(
            url, json={"target_num_updates": target}, headers={**actor.headers, "If-Match": etag}
        )
        return response.status, target

    results = await asyncio.gather(*(patch(target) for target in range(10, 20)))
    assert Counter(status for status, _ in results) == Counter({200: 1, 412: 9})
    winner = next(target for status, target in results if status == 200)
    assert (await get_training(client, actor, training_id))["target_num_updates"] == winner


async def test_concurrent_patches_of_different_fields_all_land(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/"
    bodies = [
        {"metric_names": ["acc"]},
        {"aggregation_method": "FedDC"},
        {"uncertainty_method": "ENSEMBLE"},
        {"target_num_updates": 17},
    ]

    async def patch(body: dict[str, object]) -> int:
        response = await client.patch(url, json=body, headers=actor.headers)
        return response.status

    async def put_clients() -> int:
        response = await client.put(
            url + "clients/", json={"clients": [participant.id]}, headers=actor.headers
        )
        return response.status

    statuses = await asyncio.gather(*(patch(body) for body in bodies), put_clients())
    assert statuses == [200, 200, 200, 200, 202]
    training = await get_training(client, actor, training_id)
    for body in bodies:
        for key, value in body.items():
            assert training[key] == value, key
    assert training["participants"] == [participant.id]
