"""Held-out data sets and the service's own evaluation of every new global model."""

import io
from typing import Any

import numpy as np
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.inference.evaluation import score
from fltraining.settings import Settings
from fltraining.weights import dump_tensors, load_tensors
from routes.app import create_app
from tests.fl_clients import SimulatedClient, wait_for_state, wait_until
from tests.helpers import Account, create_training, register, stored_blobs, upload_model
from tests.onnx_graphs import graph
from tests.test_rounds import events_of, run_training

X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 0.0]], np.float32)
Y = np.array([0, 1, 2, 0], np.int64)


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


async def post_dataset(client: TestClient, account: Account, content: bytes, name: str = "held out") -> Any:
    form = FormData()
    form.add_field("name", name)
    form.add_field("dataset_file", content, filename="data.npz")
    return await client.post("/api/datasets/", data=form, headers=account.headers)


async def new_dataset(client: TestClient, account: Account, x: np.ndarray = X, y: np.ndarray = Y) -> str:
    response = await post_dataset(client, account, npz(x=x, y=y))
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def events_of_type(api: TestClient, actor: Account, training_id: str, kind: str, count: int) -> list[Any]:
    """The training's events of a kind, once `count` are there (evaluations run beside the rounds)."""
    found: list[Any] = []

    async def arrived() -> bool:
        found[:] = [event for event in await events_of(api, actor, training_id) if event["type"] == kind]
        return len(found) >= count

    await wait_until(arrived, f"{count} {kind} events")
    return found


async def test_a_data_set_is_described_and_visible_to_its_owner_only(client: TestClient) -> None:
    owner, other = await register(client), await register(client)
    response = await post_dataset(client, owner, npz(x=X, y=Y))
    assert response.status == 201
    body = await response.json()
    assert (body["samples"], body["x_shape"], body["y_shape"], body["y_dtype"]) == (4, [4, 2], [4], "int64")
    assert response.headers["Location"] == f"/api/datasets/{body['id']}/"
    assert (await client.get(f"/api/datasets/{body['id']}/", headers=owner.headers)).status == 200
    assert (await client.get(f"/api/datasets/{body['id']}/", headers=other.headers)).status == 403
    assert (await client.delete(f"/api/datasets/{body['id']}/", headers=other.headers)).status == 403
    assert [item["id"] for item in await (await client.get("/api/datasets/", headers=owner.headers)).json()] == [
        body["id"]]
    assert await (await client.get("/api/datasets/", headers=other.headers)).json() == []
    assert (await client.delete(f"/api/datasets/{body['id']}/", headers=owner.headers)).status == 200
    assert (await client.get(f"/api/datasets/{body['id']}/", headers=owner.headers)).status == 404
    assert await stored_blobs(client) == set()


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([object(), object()], dtype=object), y=Y[:2])
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "says"), [
    (dump_tensors({"x": X, "y": Y}), ".npz"),
    (_pickled(), "dataset_file"),
    (npz(x=X), "exactly the arrays x and y"),
    (npz(x=X, y=Y[:3]), "same number"),
    (npz(x=np.full((2, 2), np.nan, np.float32), y=Y[:2]), "NaN"),
    (b"", ".npz"),
], ids=["safetensors", "pickled objects", "no y", "lengths differ", "NaN", "empty"])
async def test_bad_data_sets_are_400_and_store_nothing(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], content: bytes, says: str
) -> None:
    owner = await register(client)
    response = await post_dataset(client, owner, content)
    assert response.status == 400, await response.text()
    assert says in (await response.json())["detail"]
    assert await raw_db["datasets"].count_documents({}) == 0
    assert await stored_blobs(client) == set()


async def test_data_set_size_is_bounded(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"max_dataset_bytes": 2048})))
    owner = await register(client)
    response = await post_dataset(client, owner, npz(x=np.zeros((300, 2), np.float32), y=np.zeros(300, np.int64)))
    assert response.status == 413
    assert await stored_blobs(client) == set()


async def test_evaluation_options_must_name_an_own_data_set_and_a_model_with_a_graph(client: TestClient) -> None:
    actor, other = await register(client, actor=True), await register(client, actor=True)
    model_id = await upload_model(client, actor, graph())
    theirs = await new_dataset(client, other)
    mine = await new_dataset(client, actor)
    for options, says in (({"dataset": theirs}, "no data set of yours"), ({"dataset": "nope"}, "Invalid options"),
                          ({"dataset": mine, "x": 1}, "Invalid options")):
        response = await client.post("/api/trainings/", headers=actor.headers, json={
            "model_id": model_id, "target_num_updates": 1, "options": {"evaluation": options}})
        assert response.status == 400 and says in (await response.json())["detail"], options
    tensors_only = await upload_model(client, actor, dump_tensors(load_tensors(graph())))
    response = await client.post("/api/trainings/", headers=actor.headers, json={
        "model_id": tensors_only, "target_num_updates": 1, "options": {"evaluation": {"dataset": mine}}})
    assert response.status == 400 and "no graph" in str(await response.json())
    training_id = await create_training(client, actor, model_id)
    response = await client.patch(f"/api/trainings/{training_id}/", headers=actor.headers,
                                  json={"options": {"evaluation": {"dataset": theirs}}})
    assert response.status == 400
    response = await client.patch(f"/api/trainings/{training_id}/", headers=actor.headers,
                                  json={"options": {"evaluation": {"dataset": mine}}})
    assert response.status == 200, await response.text()


# The rule, the server optimizer and the privacy of a round change the model evaluated, never the evaluation.
@pytest.mark.parametrize("extra", [
    {}, {"aggregation": {"rule": "krum", "byzantine": 0}, "server_optimizer": {"name": "adagrad"}},
    {"differential_privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5}},
], ids=["mean", "krum-adagrad", "private"])
async def test_every_aggregation_is_evaluated_on_the_held_out_data(
    api: TestClient, clients: list[SimulatedClient], extra: dict[str, Any]
) -> None:
    actor = await register(api, actor=True)
    dataset = await new_dataset(api, actor)
    training_id = await run_training(api, actor, clients, graph(softmax=True), target_num_updates=2,
                                     options={"evaluation": {"dataset": dataset}, **extra})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    trail = await events_of_type(api, actor, training_id, "evaluated", 2)
    assert [event["round"] for event in trail] == [1, 2]
    metrics = await (await api.get(f"/api/models/{final['model']}/metrics/", headers=actor.headers)).json()
    server = {(m["key"], m["step"]): m for m in metrics if m["reporter"] is None}
    assert set(server) == {(key, step) for key in ("server_accuracy", "server_loss") for step in (1, 2)}
    weights = await clients[0].download(final["model"])
    logits = X.astype(np.float64) @ weights["layer.weight"].T + weights["layer.bias"]
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = score(probabilities / probabilities.sum(axis=1, keepdims=True), Y)
    assert server[("server_accuracy", 2)]["value_float"] == pytest.approx(expected["server_accuracy"])
    assert server[("server_loss", 2)]["value_float"] == pytest.approx(expected["server_loss"], rel=1e-5)
    assert trail[-1]["data"]["server_loss"] == pytest.approx(expected["server_loss"], rel=1e-5)
    aggregated = [event["data"] for event in await events_of(api, actor, training_id) if event["type"] == "aggregated"]
    assert [data["rule"] for data in aggregated] == [extra.get("aggregation", {}).get("rule", "mean")] * 2
    assert [data.get("optimizer") for data in aggregated] == [extra.get("server_optimizer", {}).get("name")] * 2
    assert [("epsilon" in data.get("privacy", {})) for data in aggregated] == ["differential_privacy" in extra] * 2


async def test_a_failed_evaluation_is_recorded_and_the_training_goes_on(
    api: TestClient, clients: list[SimulatedClient]
) -> None:
    """Labels the model cannot answer (class 7 of 3) fail every evaluation; the rounds still complete."""
    actor = await register(api, actor=True)
    dataset = await new_dataset(api, actor, y=np.array([0, 1, 7, 0], np.int64))
    training_id = await run_training(api, actor, clients, graph(), target_num_updates=2,
                                     options={"evaluation": {"dataset": dataset}})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    failed = await events_of_type(api, actor, training_id, "evaluation_failed", 2)
    assert [event["round"] for event in failed] == [1, 2]
    assert "labels outside" in failed[0]["data"]["reason"]
