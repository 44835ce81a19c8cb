"""Robust aggregation rules in trainings: validated options, refused starts, rounds that use them."""

from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, model_bytes, wait_for_state
from tests.helpers import create_training, register, upload_model
from tests.test_rounds import events_of, run_training


async def test_median_rule_rounds_take_the_coordinatewise_median(api: TestClient,
                                                                 clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2,
                                     options={"aggregation": {"rule": "median"}, "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    # Each round the clients add 1, 2, 3 (sample sizes 1, 2, 3): the median step is 2 (the mean's is 14/6).
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        np.testing.assert_array_equal(value, np.full(GLOBAL_TENSORS[name].shape, 4.0, np.float32))
    aggregated = [event for event in await events_of(api, actor, training_id) if event["type"] == "aggregated"]
    assert [event["data"]["rule"] for event in aggregated] == ["median", "median"]


async def test_krum_round_takes_the_selected_update_and_records_the_choice(
        api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=1,
                                     options={"aggregation": {"rule": "krum", "byzantine": 0},
                                              "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    event = next(e for e in await events_of(api, actor, training_id) if e["type"] == "aggregated")
    data: dict[str, Any] = event["data"]
    assert data["rule"] == "krum" and len(data["selected"]) == 1
    # Updates are w + 1, w + 2, w + 3 over 9 coordinates: nearest-neighbour distances 9, 9, 9 — a tie,
    # broken by the lower participant id.
    assert data["scores"] == {client.account.id: 9.0 for client in clients}
    chosen = min(clients, key=lambda client: client.account.id)
    assert data["selected"] == [chosen.account.id]
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        np.testing.assert_array_equal(value, np.full(GLOBAL_TENSORS[name].shape, chosen.index + 1, np.float32))


async def test_start_refuses_a_rule_the_participants_cannot_satisfy(api: TestClient,
                                                                   clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    training_id = await create_training(api, actor, model_id, clients=[c.account.id for c in clients],
                                        options={"aggregation": {"rule": "krum", "byzantine": 1}})
    refused = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert refused.status == 409
    assert "needs at least 5 updates per round; this training may aggregate 3" in (await refused.json())["detail"]
    training = await (await api.get(f"/api/trainings/{training_id}/", headers=actor.headers)).json()
    assert training["state"] == "I"
    # Fixed by PATCH, it starts.
    patched = await api.patch(f"/api/trainings/{training_id}/", headers=actor.headers,
                              json={"options": {"aggregation": {"rule": "multi_krum", "byzantine": 0, "select": 2}}})
    assert patched.status == 200, await patched.text()
    assert (await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)).status == 202


async def test_bad_rules_are_400_naming_the_key(api: TestClient) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    for aggregation, key in (({"rule": "mode"}, "aggregation"), ({"rule": "trimmed_mean", "trim_fraction": 0.5},
                                                                 "trim_fraction"),
                             ({"rule": "krum", "byzantine": -1}, "byzantine"), ({"rule": "multi_krum"}, "select"),
                             ({"rule": "median", "extra": 1}, "extra")):
        response = await api.post("/api/trainings/", headers=actor.headers, json={
            "model_id": model_id, "target_num_updates": 1, "options": {"aggregation": aggregation}})
        assert response.status == 400, aggregation
        body = await response.json()
        assert any(key in ".".join(map(str, error["loc"])) for error in body["errors"]), body
