"""ONNX graphs as model files: uploaded, described by their initializers, trained, handed back as graphs."""

from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.weights import detect_format, load_tensors
from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, wait_for_state
from tests.helpers import nothing_stored, register, upload_model
from tests.onnx_graphs import graph, relu_int16_graph
from tests.test_models import model_form
from tests.test_rounds import run_training


async def test_an_onnx_graph_is_a_model_described_by_its_initializers(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph())
    stored = await raw_db["models"].find_one({})
    assert stored is not None and stored["format"] == "onnx"
    assert {(t["name"], tuple(t["shape"]), t["dtype"]) for t in stored["tensors"]} == {
        ("layer.weight", (3, 2), "float32"), ("layer.bias", (3,), "float32")}
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert await response.read() == graph()


@pytest.mark.parametrize(("content", "why"), [
    (graph(domain="com.example.custom"), "custom"),
    (graph(external=True), "external data"),
    (relu_int16_graph(), "onnxruntime's CPU provider cannot run"),
], ids=["custom domain", "external data", "operator onnxruntime lacks"])
async def test_graphs_that_are_not_self_contained_standard_onnx_are_refused(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], content: bytes, why: str
) -> None:
    owner = await register(client)
    response = await client.post("/api/models/", data=model_form(content, name="g"), headers=owner.headers)
    assert response.status == 400
    assert why in (await response.json())["detail"]
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


async def test_an_onnx_model_is_trained_and_handed_back_as_the_same_graph(
    api: TestClient, clients: list[SimulatedClient]
) -> None:
    """Clients send safetensors updates named like the initializers; the new global model is the graph
    with the weighted mean as its initializers, and onnxruntime runs it."""
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, graph(), target_num_updates=1)
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    content = await (await api.get(f"/api/models/{final['model']}/", headers=actor.headers)).read()
    assert detect_format(content) == "onnx"
    onnx.checker.check_model(onnx.load_model_from_string(content))
    mean = load_tensors(content)
    for name, value in mean.items():  # each client adds (index + 1), sample sizes 1, 2, 3: 14/6
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 14 / 6), rtol=1e-6)
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    x = np.array([[1.0, 2.0]], np.float32)
    [y] = session.run(None, {"X": x})
    np.testing.assert_allclose(y, x @ mean["layer.weight"].T + mean["layer.bias"], rtol=1e-6)
