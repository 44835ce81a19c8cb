"""Robust aggregation rules in trainings: validated options, refused starts, rounds that use them."""

from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, model_bytes, wait_for_state
from tests.helpers import create_training, register, upload_model
from tests.test_rounds import events_of, run_training
from tests.test_server_optimizers import reference


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


async def test_feddc_sub_rounds_that_aggregate_use_the_rule_and_the_optimizer(
        api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2, aggregation_method="FedDC",
                                     options={"daisy_chain_period": 2, "aggregation": {"rule": "median"},
                                              "server_optimizer": {"name": "adam"}, "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    assert final["round"] == 4
    events = await events_of(api, actor, training_id)
    aggregated = {event["round"]: event["data"] for event in events if event["type"] == "aggregated"}
    chains = {event["round"]: event["data"] for event in events if event["type"] == "daisy_chained"}
    assert sorted(aggregated) == [1, 3] and sorted(chains) == [0, 2]
    assert [(aggregated[r]["rule"], aggregated[r]["optimizer_step"]) for r in (1, 3)] == [("median", 1), ("median", 2)]
    assert not any("optimizer" in data or "rule" in data for data in chains.values())
    # Follow every model along the chains (each client adds index + 1; all entries stay equal): the median
    # of a sub-round's models is the combined update, the optimizer steps from the global model towards it.
    update_of = {(r, arrival["user"]): arrival["update"]
                 for r, data in [*aggregated.items(), *chains.items()] for arrival in data["arrivals"]}
    start, targets, value_of = np.zeros(1), [], {}
    global_value = start
    for round_ in range(4):
        for client in clients:
            user = client.account.id
            trained = chains[round_ - 1]["chain"][user] if round_ - 1 in chains else None
            base = global_value if trained is None else value_of[trained]
            value_of[update_of[(round_, user)]] = base + client.index + 1
        if round_ in aggregated:
            targets.append(np.median([value_of[update_of[(round_, c.account.id)]] for c in clients], axis=0))
            global_value = reference(start, targets, "adam")
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, global_value[0]), rtol=1e-5)


async def test_fedprox_rounds_take_the_rule(api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2, aggregation_method="FedProx",
                                     options={"fedprox_mu": 0.1, "skip_model_tests": True,
                                              "aggregation": {"rule": "trimmed_mean", "trim_fraction": 0.34}})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    # 0.34 of 3 trims one update at each end: the middle client's step, 2 per round.
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        np.testing.assert_array_equal(value, np.full(GLOBAL_TENSORS[name].shape, 4.0, np.float32))
