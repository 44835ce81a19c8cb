"""`POST /api/inference/`: predictions with the model's current weights and its training's uncertainty."""

import io
import json
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.settings import Settings
from fltraining.weights import dump_tensors
from routes.app import create_app
from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, wait_for_state
from tests.helpers import Account, create_training, register, stored_blobs, upload_model
from tests.onnx_graphs import graph, hidden_dropout_graph, relu_int16_graph
from tests.test_properties import PROPERTY
from tests.test_rounds import run_training

WEIGHTS = {
    "layer.weight": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32),
    "layer.bias": np.array([0.0, 0.5, -3.0], np.float32),
}
X = [[2.0, 1.0], [0.0, 3.0]]


def linear(x: Any, weights: dict[str, np.ndarray] = WEIGHTS) -> np.ndarray:
    """What the graph computes: x·Wᵀ + b."""
    return np.asarray(x, np.float64) @ weights["layer.weight"].T.astype(np.float64) + weights["layer.bias"]


async def infer(client: TestClient, account: Account, model_id: str, model_input: Any = X,
                **extra: Any) -> tuple[int, Any]:
    response = await client.post("/api/inference/", headers=account.headers,
                                 json={"model_id": model_id, "model_input": model_input, **extra})
    body = await response.read()
    return response.status, json.loads(body) if response.content_type == "application/json" else body


async def test_without_uncertainty_the_answer_is_dlrs_argmax_with_the_raw_outputs(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    status, body = await infer(client, owner, model_id)
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"], linear(X), rtol=1e-6)
    assert body["inference"] == [0, 1]  # rows [2, 1.5, 0] and [0, 3.5, 0]
    assert body["uncertainty"] == {}


async def test_binary_answers_are_safetensors_holding_the_same_arrays(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    status, body = await infer(client, owner, model_id, return_format="binary")
    assert status == 200
    arrays = safetensors.numpy.load(body)
    assert arrays["inference"].tolist() == [0, 1]
    np.testing.assert_allclose(arrays["outputs"], linear(X), rtol=1e-6)


async def test_the_openapi_document_names_both_answers_and_both_request_forms(client: TestClient) -> None:
    """Generated clients learn that return_format=binary (multipart's default) answers a file, not JSON."""
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    operation = (await (await client.get("/api/openapi.json")).json())["paths"]["/api/inference/"]["post"]
    answers = operation["responses"]["200"]["content"]
    assert set(answers) == {"application/json", "application/octet-stream"}
    forms = operation["requestBody"]["content"]
    assert set(forms) == {"application/json", "multipart/form-data"}
    multipart = forms["multipart/form-data"]["schema"]
    assert multipart["properties"]["return_format"]["default"] == "binary"
    assert set(multipart["required"]) == {"model_id", "model_input"}
    assert forms["application/json"]["schema"]["$ref"].endswith("/InferenceRequest")
    for return_format in ("json", "binary"):
        response = await client.post("/api/inference/", headers=owner.headers, json={
            "model_id": model_id, "model_input": X, "return_format": return_format})
        assert response.status == 200, await response.text()
        assert response.content_type in answers
        assert response.content_type == ("application/json" if return_format == "json" else "application/octet-stream")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=array)
    return buffer.getvalue()


@pytest.mark.parametrize("encode", [
    _npy, _npz, lambda array: dump_tensors({"x": array}), lambda array: json.dumps(array.tolist()).encode(),
], ids=["npy", "npz", "safetensors", "json text"])
async def test_multipart_input_files_are_read_and_answered_in_binary_by_default(
    client: TestClient, encode: Any
) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    form = FormData()
    form.add_field("model_id", model_id)
    form.add_field("model_input", encode(np.array(X, np.float64)), filename="input")
    response = await client.post("/api/inference/", data=form, headers=owner.headers)
    assert response.status == 200, await response.text()
    np.testing.assert_allclose(safetensors.numpy.load(await response.read())["outputs"], linear(X), rtol=1e-6)


async def test_a_pickled_input_file_is_refused(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    form = FormData()
    form.add_field("model_id", model_id)
    form.add_field("model_input", buffer.getvalue(), filename="input.npy")
    response = await client.post("/api/inference/", data=form, headers=owner.headers)
    assert response.status == 400
    assert "model_input" in (await response.json())["detail"]


@pytest.mark.parametrize(("model_input", "says"), [
    ([[1.0, 2.0], [3.0]], "ragged"),
    ([["a", "b"]], "numbers"),
    ([[1.0, 2.0, 3.0]], "dimension 1"),
    ([1.0, 2.0], "dimensions"),
    ([], "at least 1 item"),
    ([[1e39, 0.0]], "too large for float32"),
    ([[True, False]], "booleans"),
    ([[{"x": 1}, 2.0]], "numbers"),
], ids=["ragged", "strings", "wrong width", "wrong rank", "empty", "overflows float32", "booleans", "objects"])
async def test_bad_inputs_are_400_naming_the_problem(client: TestClient, model_input: Any, says: str) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    status, body = await infer(client, owner, model_id, model_input)
    assert status == 400, body
    assert says in json.dumps(body)


async def test_json_nan_and_oversized_inputs_are_refused(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    response = await client.post("/api/inference/", headers={**owner.headers, "Content-Type": "application/json"},
                                 data=f'{{"model_id": "{model_id}", "model_input": [[NaN, 1.0]]}}')
    assert response.status == 400
    form = FormData()
    form.add_field("model_id", model_id)
    form.add_field("model_input", _npy(np.array([[np.inf, 1.0]])), filename="x.npy")
    response = await client.post("/api/inference/", data=form, headers=owner.headers)
    assert response.status == 400 and "NaN or infinite" in (await response.json())["detail"]


async def test_input_size_is_bounded(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"inference_max_elements": 10})))
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    assert (await infer(client, owner, model_id, [[0.0, 0.0]] * 5))[0] == 200
    status, body = await infer(client, owner, model_id, [[0.0, 0.0]] * 6)
    assert status == 400 and "more than 10 numbers" in body["detail"]
    form = FormData()
    form.add_field("model_id", model_id)
    form.add_field("model_input", _npy(np.zeros((6, 2))), filename="x.npy")
    response = await client.post("/api/inference/", data=form, headers=owner.headers)
    assert response.status == 400 and "more than 10 numbers" in (await response.json())["detail"]


async def test_the_recorded_input_shape_is_enforced(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS), input_shape="[null, 2]")
    assert (await infer(client, owner, model_id))[0] == 200
    shaped = await upload_model(client, owner, graph(WEIGHTS), input_shape="[1, 2]")
    status, body = await infer(client, owner, shaped)  # two rows where the model takes one
    assert status == 400 and "input_shape" in body["detail"]


@PROPERTY
@given(model_input=st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=12,
))
async def test_any_json_model_input_is_answered_or_refused_with_400(client: TestClient, model_input: Any) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    status, body = await infer(client, owner, model_id, model_input)
    assert status in (200, 400), body
    if status == 200:
        np.testing.assert_allclose(body["outputs"], linear(model_input), rtol=1e-5, atol=1e-5)
    else:
        assert body["detail"]


async def test_unknown_invisible_graphless_and_non_json_requests(client: TestClient) -> None:
    owner, stranger = await register(client), await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    assert (await infer(client, owner, "00000000-0000-4000-8000-000000000000"))[0] == 404
    assert (await infer(client, stranger, model_id))[0] == 403
    tensors_only = await upload_model(client, owner, dump_tensors(WEIGHTS))
    status, body = await infer(client, owner, tensors_only)
    assert status == 409 and f"/api/models/{tensors_only}/graph/" in body["detail"]
    response = await client.post("/api/inference/", data="x", headers={**owner.headers, "Content-Type": "text/plain"})
    assert response.status == 415
    response = await client.post("/api/inference/", json={"model_input": X}, headers=owner.headers)
    assert response.status == 400 and "model_id" in (await response.json())["detail"]


async def test_an_attached_graph_runs_with_the_models_own_weights(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    """The graph's initializer values are placeholders: the model's tensors are bound by name."""
    owner, stranger = await register(client), await register(client)
    model_id = await upload_model(client, owner, dump_tensors(WEIGHTS))
    form = FormData()
    form.add_field("graph_file", graph(GLOBAL_TENSORS), filename="model.onnx")
    assert (await client.put(f"/api/models/{model_id}/graph/", data=form, headers=stranger.headers)).status == 403
    form = FormData()
    form.add_field("graph_file", graph(GLOBAL_TENSORS), filename="model.onnx")
    response = await client.put(f"/api/models/{model_id}/graph/", data=form, headers=owner.headers)
    assert response.status == 200, await response.text()
    assert len((await response.json())["graph_digest"]) == 64
    status, body = await infer(client, owner, model_id)
    assert status == 200
    np.testing.assert_allclose(body["outputs"], linear(X), rtol=1e-6)


@pytest.mark.parametrize(("content", "says"), [
    (graph().replace(b"layer.bias", b"layer.bia2"), "layer.bia"),
    (graph({"layer.weight": np.zeros((2, 2), np.float32), "layer.bias": np.zeros(3, np.float32)}), "shape"),
    (relu_int16_graph(), "onnxruntime"),
    (b"not a graph", "ONNX"),
    (graph(domain="com.example.custom"), "custom"),
], ids=["names", "shape", "operator onnxruntime lacks", "not onnx", "custom domain"])
async def test_a_graph_that_does_not_fit_the_model_is_400_and_changes_nothing(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], content: bytes, says: str
) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, dump_tensors(WEIGHTS))
    files_before = await raw_db["models"].distinct("file_id")
    form = FormData()
    form.add_field("graph_file", content, filename="model.onnx")
    response = await client.put(f"/api/models/{model_id}/graph/", data=form, headers=owner.headers)
    assert response.status == 400, await response.text()
    assert says in (await response.json())["detail"]
    stored = await raw_db["models"].find_one({})
    assert stored is not None and stored["graph_file_id"] is None and stored["graph_digest"] is None
    assert await raw_db["models"].distinct("file_id") == files_before
    assert len(await stored_blobs(client)) == 1  # the refused graph's bytes are gone


async def test_an_onnx_model_cannot_have_another_graph_attached(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, graph(WEIGHTS))
    form = FormData()
    form.add_field("graph_file", graph(WEIGHTS), filename="model.onnx")
    assert (await client.put(f"/api/models/{model_id}/graph/", data=form, headers=owner.headers)).status == 409


async def test_mc_dropout_runs_n_different_passes_and_reports_dlrs_statistics(client: TestClient) -> None:
    actor = await register(client, actor=True)
    model_id = await upload_model(client, actor, graph(WEIGHTS, dropout=True, softmax=True))
    await create_training(client, actor, model_id, uncertainty_method="MC_DROPOUT",
                          options={"uncertainty": {"N": 40}})
    status, body = await infer(client, actor, model_id, [[2.0, 1.0]] * 3)
    assert status == 200, body
    assert set(body["uncertainty"]) == {"variance", "std", "predictive_entropy", "expected_entropy", "mutual_info"}
    variance = np.array(body["uncertainty"]["variance"])
    assert variance.shape == (3, 3) and (variance > 0).all()  # dropout really ran in training mode
    np.testing.assert_allclose(np.array(body["uncertainty"]["std"]) ** 2, variance, rtol=1e-9)
    assert (np.array(body["uncertainty"]["mutual_info"]) > 0).all()
    np.testing.assert_allclose(np.array(body["inference"]).sum(axis=1), 1.0, rtol=1e-6)


async def test_mc_dropout_drops_units_inside_the_network(client: TestClient) -> None:
    """Eight hidden units of value 1 each feed the output with weight 1: each pass keeps k of them, scaled by 2,
    so the output is 2k with k ~ Binomial(8, 0.5): mean 8, variance 4·8·0.25 = 8 (not a rounding error's)."""
    weights = {"hidden.weight": np.zeros((8, 2), np.float32), "hidden.bias": np.ones(8, np.float32),
               "out.weight": np.ones((1, 8), np.float32), "out.bias": np.zeros(1, np.float32)}
    actor = await register(client, actor=True)
    model_id = await upload_model(client, actor, hidden_dropout_graph(weights))
    await create_training(client, actor, model_id, uncertainty_method="MC_DROPOUT", options={"uncertainty": {"N": 400}})
    status, body = await infer(client, actor, model_id, [[0.0, 0.0]])
    assert status == 200, body
    assert 7.0 < body["inference"][0][0] < 9.0
    assert 5.0 < body["uncertainty"]["variance"][0][0] < 11.0


@pytest.mark.parametrize(("method", "says"), [("MC_DROPOUT", "Dropout nodes"), ("SWAG", "first SWAG round")],
                         ids=["MC dropout without Dropout nodes", "SWAG before its first SWAG round"])
async def test_a_method_the_model_cannot_run_yet_is_409_naming_why(client: TestClient, method: str, says: str) -> None:
    actor = await register(client, actor=True)
    model_id = await upload_model(client, actor, graph(WEIGHTS))
    await create_training(client, actor, model_id, uncertainty_method=method)
    status, body = await infer(client, actor, model_id)
    assert status == 409 and says in body["detail"]


async def test_ensembles_average_their_members_and_report_their_spread(client: TestClient) -> None:
    owner, stranger = await register(client), await register(client)
    other = {"layer.weight": WEIGHTS["layer.weight"] * 3, "layer.bias": WEIGHTS["layer.bias"] + 1}
    first = await upload_model(client, owner, graph(WEIGHTS))
    second = await upload_model(client, owner, graph(other))
    response = await client.post("/api/models/ensembles/", headers=owner.headers,
                                 json={"name": "pair", "models": [first, second]})
    assert response.status == 201, await response.text()
    ensemble = (await response.json())["model_id"]
    status, body = await infer(client, owner, ensemble)
    assert status == 200, body
    outputs = np.stack([linear(X), linear(X, other)])
    np.testing.assert_allclose(body["inference"], outputs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(body["uncertainty"]["variance"], outputs.var(axis=0, ddof=1), rtol=1e-5)
    assert "predictive_entropy" not in body["uncertainty"]  # outputs outside [0, 1] are not probabilities
    metadata = await (await client.get(f"/api/models/{ensemble}/metadata/", headers=owner.headers)).json()
    assert metadata["ensemble_members"] == [first, second]
    theirs = await upload_model(client, stranger, graph(WEIGHTS))
    response = await client.post("/api/models/ensembles/", headers=owner.headers,
                                 json={"name": "x", "models": [first, theirs]})
    assert response.status == 403
    await client.delete(f"/api/models/{second}/", headers=owner.headers)
    status, body = await infer(client, owner, ensemble)
    assert status == 409 and second in body["detail"]


@pytest.mark.parametrize(("members", "says"), [
    ("one", "at least 2"),
    ("repeated", "once"),
    ("other graph", "another graph"),
    ("no graph", "no ONNX graph"),
])
async def test_ensemble_members_must_be_distinct_alike_and_runnable(
    client: TestClient, members: str, says: str
) -> None:
    owner = await register(client)
    first = await upload_model(client, owner, graph(WEIGHTS))
    ids = {
        "one": [first],
        "repeated": [first, first],
        "other graph": [first, await upload_model(client, owner, graph(WEIGHTS, softmax=True))],
        "no graph": [first, await upload_model(client, owner, dump_tensors(WEIGHTS))],
    }[members]
    response = await client.post("/api/models/ensembles/", headers=owner.headers, json={"name": "e", "models": ids})
    assert response.status == 400
    assert says in json.dumps(await response.json())


async def test_swag_samples_independent_weights_per_pass_reproducibly(
    api: TestClient, clients: list[SimulatedClient]
) -> None:
    """The clients' moments differ by client (first = w + i), so the posterior has spread: independent
    samples give the passes different outputs (DLR reuses one sample: zero variance)."""
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, graph(), target_num_updates=1, uncertainty_method="SWAG",
                                     options={"uncertainty": {"N": 25, "seed": 7}})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    status, first = await infer(api, actor, final["model"])
    assert status == 200, first
    assert (np.array(first["uncertainty"]["variance"]) > 0).all()
    assert (await infer(api, actor, final["model"]))[1] == first  # same seed, same samples


async def test_inference_follows_the_global_model_round_by_round(
    api: TestClient, clients: list[SimulatedClient]
) -> None:
    """A session cached for the first weights is not used once a round replaced them."""
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, graph())
    before = await infer(api, actor, model_id)
    training_id = await create_training(api, actor, model_id, clients=[c.account.id for c in clients],
                                        target_num_updates=1)
    assert (await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)).status == 202
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    status, after = await infer(api, actor, final["model"])
    assert status == 200
    trained = await clients[0].download(final["model"])
    np.testing.assert_allclose(after["outputs"], linear(X, trained), rtol=1e-6)
    assert before[0] == 200 and before[1]["outputs"] != after["outputs"]


@pytest.mark.parametrize("keep", [True, False], ids=["local models kept", "local models dropped"])
async def test_a_federated_ensemble_runs_the_last_rounds_local_models(
    api: TestClient, clients: list[SimulatedClient], keep: bool
) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, graph(), target_num_updates=1, uncertainty_method="ENSEMBLE",
                                     options={"keep_local_models": keep})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    status, body = await infer(api, actor, final["model"])
    if not keep:
        assert status == 409 and "keep_local_models" in body["detail"]
        return
    assert status == 200, body
    local = [{name: value + np.float32(client.delta(client.index, 0)) for name, value in GLOBAL_TENSORS.items()}
             for client in clients]
    outputs = np.stack([linear(X, weights) for weights in local])
    np.testing.assert_allclose(body["inference"], outputs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(body["uncertainty"]["variance"], outputs.var(axis=0, ddof=1), rtol=1e-5)
