"""The main path end to end: register, upload, create, register clients, start."""

from aiohttp.test_utils import TestClient

from tests.helpers import create_training, get_training, register


async def test_create_and_start_a_training(client: TestClient) -> None:
    actor = await register(client)
    participant = await register(client)
    training_id = await create_training(client, actor, options={"daisy_chain_period": 5}, target_num_updates=42)
    training = await get_training(client, actor, training_id)
    assert training["target_num_updates"] == 210
    assert training["state"] == "I"
    response = await client.put(f"/api/trainings/{training_id}/clients/", json={"clients": [participant.id]}, headers=actor.headers)
    assert response.status == 202
    response = await client.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 202, await response.text()
    training = await get_training(client, participant, training_id)
    assert training["state"] == "O"
    assert training["participants"] == [participant.id]
