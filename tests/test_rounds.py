"""End to end over real HTTP: simulated clients run trainings to completion through notifications."""

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from fltraining.settings import Settings
from routes.app import create_app
from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, model_bytes, start_clients, stop_clients, wait_for_notification, wait_for_state
from tests.helpers import Account, create_training, register, upload_model


@pytest.fixture
def settings(database_url: str, tmp_path: Any) -> Settings:
    """Engine settings for tests: loopback endpoints allowed, fast reconciling and retries."""
    return Settings(mongodb_url=database_url, data_dir=tmp_path, password_hash_time_cost=1,
                    notification_allow_loopback=True, reconcile_interval_seconds=0.2,
                    notification_backoff_seconds=0.05, lock_lease_seconds=2)


@pytest.fixture
async def api(aiohttp_client: Any, settings: Settings) -> TestClient:
    """The service under test."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def clients(api: TestClient) -> AsyncIterator[list[SimulatedClient]]:
    """Three simulated clients with sample sizes 1, 2, 3."""
    clients = await start_clients(api, 3)
    for client in clients:
        client.sample_size = client.index + 1
    yield clients
    await stop_clients(clients)


async def run_training(api: TestClient, actor: Account, clients: list[SimulatedClient], **body: Any) -> str:
    """Create and start a training of the simulated clients; returns its id."""
    model_id = await upload_model(api, actor, model_bytes())
    training_id = await create_training(api, actor, model_id, clients=[c.account.id for c in clients], **body)
    response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 202, await response.text()
    return training_id


async def events_of(api: TestClient, account: Account, training_id: str) -> list[dict[str, Any]]:
    """The training's whole audit trail."""
    response = await api.get(f"/api/trainings/{training_id}/events/?limit=1000", headers=account.headers)
    assert response.status == 200, await response.text()
    return list(await response.json())


async def test_fedavg_runs_to_completion(api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=3)
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    assert final["round"] == 3
    # Each round every client adds (index + 1) with sample sizes 1, 2, 3: the mean step is 14/6.
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        assert value.dtype == GLOBAL_TENSORS[name].dtype
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 3 * 14 / 6), rtol=1e-6)
    await wait_for_notification(clients, "TRAINING_FINISHED")
    for client in clients:
        assert not client.errors
        assert client.types() == ["TRAINING_START", *["UPDATE_ROUND_START", "MODEL_TEST_ROUND"] * 3,
                                  "TRAINING_FINISHED"]
    types = [event["type"] for event in await events_of(api, actor, training_id)]
    assert types.count("aggregated") == 3
    assert types.count("testing_completed") == 3
