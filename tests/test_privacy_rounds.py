"""Differentially private trainings: the clipped mean in the global model, ε in the detail and the events,
budgets refused at start, and the test-only noise seed."""

from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, model_bytes, wait_for_state
from tests.helpers import create_training, register, upload_model
from tests.test_privacy import accountant_epsilon
from tests.test_rounds import events_of, run_training


async def test_without_noise_rounds_add_the_clipped_mean(api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2, options={
        "differential_privacy": {"clip_norm": 1.0, "noise_multiplier": 0.0}, "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    # Clients move all 9 coordinates by 1, 2, 3 (norms 3, 6, 9): each is clipped to norm 1, i.e. 1/3 per
    # coordinate, whatever its sample size; two rounds add 2/3.
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 2 / 3), rtol=1e-6)
    assert final["privacy"] == {"epsilon": None, "delta": 1e-5, "rounds": 2, "clip_norm": 1.0, "noise_multiplier": 0.0}
    aggregated = [e for e in await events_of(api, actor, training_id) if e["type"] == "aggregated"]
    assert [e["data"]["privacy"]["clipped"] for e in aggregated] == [3, 3]


async def test_epsilon_in_the_detail_and_each_aggregation_is_dp_accountings(
        api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    privacy = {"clip_norm": 2.0, "noise_multiplier": 0.8, "delta": 1e-6}
    training_id = await run_training(api, actor, clients, target_num_updates=2,
                                     options={"differential_privacy": privacy, "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    assert final["privacy"]["epsilon"] == accountant_epsilon(0.8, 2, 1e-6)
    aggregated = [e for e in await events_of(api, actor, training_id) if e["type"] == "aggregated"]
    assert [e["data"]["privacy"]["epsilon"] for e in aggregated] == [accountant_epsilon(0.8, t, 1e-6) for t in (1, 2)]
    model: dict[str, Any] = await clients[0].download(final["model"])
    assert all(np.all(np.isfinite(value)) for value in model.values())


async def test_a_budget_the_plan_would_exceed_is_refused_at_start(api: TestClient,
                                                                 clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    training_id = await create_training(api, actor, model_id, target_num_updates=10,
                                        clients=[c.account.id for c in clients], options={"differential_privacy": {
                                            "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 5.0}})
    refused = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert refused.status == 409
    detail = (await refused.json())["detail"]
    assert f"reach ε = {accountant_epsilon(1.0, 10, 1e-5):.4g}" in detail and "target_epsilon 5.0" in detail
    detail_before = await (await api.get(f"/api/trainings/{training_id}/", headers=actor.headers)).json()
    assert detail_before["state"] == "I" and detail_before["privacy"]["epsilon"] == 0.0


async def test_a_noise_seed_needs_the_test_setting(api: TestClient) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    response = await api.post("/api/trainings/", headers=actor.headers, json={
        "model_id": model_id, "target_num_updates": 1,
        "options": {"differential_privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0, "seed": 3}}})
    assert response.status == 400
    errors = (await response.json())["errors"]
    assert errors[0]["loc"] == ["options", "differential_privacy", "seed"]
    assert "FLTRAINING_DP_ALLOW_SEED" in errors[0]["msg"]
