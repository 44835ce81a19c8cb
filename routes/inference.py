"""Inference endpoints: `POST /api/inference/`, attaching graphs, and ensemble models."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import numpy as np
import orjson
import safetensors.numpy
from aiohttp import web

from fltraining.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from fltraining.inference import inputs
from fltraining.inference.runner import Outcome
from fltraining.schemas.models import (
    EnsembleCreate,
    GraphForm,
    InferenceAnswer,
    InferenceForm,
    InferenceRequest,
    ModelMetadata,
    ModelUploadAccepted,
)
from routes.auth import current_user
from routes.keys import graphs_key, inference_key, settings_key
from routes.multipart import FormSpec, discard, read_form
from routes.parsing import media_type, path_uuid, read_body, read_json_bytes, validate
from routes.responses import json_model
from routes.table import Endpoint

INFERENCE_FORM = FormSpec(files=frozenset({"model_input"}), texts=frozenset({"model_id", "return_format"}))
GRAPH_FORM = FormSpec(files=frozenset({"graph_file"}))


def _json_list(array: np.ndarray) -> Any:
    """An array for orjson: NumPy arrays as they are; with values JSON cannot hold (NaN, ±inf), lists with null."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return np.where(np.isfinite(array), array, None).tolist()
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return np.ascontiguousarray(array, dtype=np.float64)
    return np.ascontiguousarray(array)


def _answer(outcome: Outcome, return_format: str) -> web.Response:
    """DLR's answer shape as JSON, or every array of it in one safetensors file (never a pickle)."""
    if return_format == "binary":
        arrays = {"inference": outcome.inference, **outcome.uncertainty}
        if outcome.outputs is not None:
            arrays["outputs"] = outcome.outputs
        body = safetensors.numpy.save({name: np.ascontiguousarray(array) for name, array in arrays.items()})
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={"Content-Disposition": 'attachment; filename="inference.safetensors"'})
    answer: dict[str, Any] = {
        "inference": _json_list(outcome.inference),
        "uncertainty": {name: _json_list(array) for name, array in outcome.uncertainty.items()},
    }
    if outcome.outputs is not None:
        answer["outputs"] = _json_list(outcome.outputs)
    return web.Response(body=orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")


def _bytes_collector(limit: int) -> Callable[[AsyncIterator[bytes]], Awaitable[bytes]]:
    """A multipart store function keeping a small file in memory (413 past `limit` bytes)."""
    async def collect(chunks: AsyncIterator[bytes]) -> bytes:
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > limit:
                raise PayloadTooLarge(f"model_input may hold at most {limit} bytes.")
        return bytes(data)
    return collect


async def _nothing(_: bytes) -> None:
    return None


def _input_from_part(data: bytes, max_elements: int) -> np.ndarray:
    """A multipart `model_input`: a .npy/.npz/safetensors file, or JSON text (as a plain form field)."""
    if data[:1] in (b"[", b" ", b"\n"):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InvalidInput("model_input text is not a JSON list of numbers.") from None
        return inputs.from_json(value, max_elements)
    return inputs.from_file(data, max_elements)


async def infer(request: web.Request) -> web.Response:
    """POST /api/inference/: JSON `{model_id, model_input, return_format}` or multipart with a `model_input` file."""
    settings = request.app[settings_key]
    service = request.app[inference_key]
    limit = settings.inference_max_body_bytes
    if media_type(request) == "multipart/form-data":
        form = await read_form(request, INFERENCE_FORM, _bytes_collector(limit), _nothing, limit)
        if "model_id" not in form.texts:
            raise InvalidInput("No 'model_id' provided in request.")
        if "model_input" not in form.files:
            raise InvalidInput("No uploaded file 'model_input' found.")
        return_format = form.texts.get("return_format", "binary")  # DLR's default for multipart
        if return_format not in ("json", "binary"):
            raise InvalidInput(f"Unknown return format '{return_format[:32]}'. Supported are binary and json.")
        try:
            model_id = UUID(form.texts["model_id"])
        except ValueError:
            raise InvalidInput("model_id must be a UUID.") from None
        model_input = _input_from_part(form.files["model_input"], service.max_elements)
    elif request.content_type in ("application/json", ""):
        try:
            raw = orjson.loads(await read_json_bytes(request, limit))  # strict JSON: no NaN, depth ≤ 1024
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"Malformed JSON: {error}") from None
        if not isinstance(raw, dict):
            raise InvalidInput("The request body must be a JSON object.")
        if "model_id" not in raw:
            raise InvalidInput("No 'model_id' provided in request.")
        body = validate(InferenceRequest, raw)
        model_id, return_format = body.model_id, body.return_format
        model_input = inputs.from_json(body.model_input, service.max_elements)
    else:
        raise UnsupportedMediaType("Only Content-Type 'application/json' and 'multipart/form-data' is supported.")
    outcome = await service.infer(current_user(request), model_id, model_input)
    return _answer(outcome, return_format)


async def attach_graph(request: web.Request) -> web.Response:
    """PUT /api/models/{id}/graph/: multipart `graph_file`, an ONNX graph whose initializers are the model's tensors."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("Send the graph as multipart/form-data with a graph_file part.")
    graphs = request.app[graphs_key]
    model_id = path_uuid(request, "model_id")
    form = await read_form(request, GRAPH_FORM, graphs.store_graph, graphs.discard,
                           request.app[settings_key].max_model_bytes)
    try:
        if "graph_file" not in form.files:
            raise InvalidInput("Missing required field: graph_file")
        model = await graphs.attach(current_user(request), model_id, form.files["graph_file"])
    except BaseException:
        await discard(form, graphs.discard)
        raise
    return json_model(ModelMetadata.model_validate(model))


async def create_ensemble(request: web.Request) -> web.Response:
    """POST /api/models/ensembles/: `{name, description, models}`, a model whose inference runs every member."""
    data = await read_body(request, EnsembleCreate)
    model = await request.app[graphs_key].create_ensemble(current_user(request), data)
    return json_model(ModelUploadAccepted(model_id=model.id), status=201,
                      headers={"Location": f"/api/models/{model.id}/metadata/"})


ENDPOINTS = [
    Endpoint("POST", "/api/inference", infer, "Predict with a model, with its training's uncertainty", "inference",
             body=InferenceRequest, multipart=InferenceForm, files=("model_input",),
             responses={200: (InferenceAnswer, "application/octet-stream")},
             errors=(400, 403, 404, 409, 413, 415, 503),
             description="JSON, or multipart with model_id, return_format and a model_input file (.npy, .npz, "
                         "safetensors). The answer's media type follows return_format: `json` (JSON's default) "
                         "answers application/json, `binary` (multipart's default, as DLR's) answers "
                         "application/octet-stream, a safetensors file of the same arrays."),
    Endpoint("POST", "/api/models/ensembles", create_ensemble, "Create an ensemble model of owned models",
             "models", body=EnsembleCreate, responses={201: ModelUploadAccepted}, errors=(400, 403, 404, 415),
             headers={201: ("Location",)}),
    Endpoint("PUT", "/api/models/{model_id}/graph", attach_graph, "Attach the ONNX graph inference runs", "models",
             multipart=GraphForm, files=("graph_file",), responses={200: ModelMetadata},
             errors=(400, 403, 404, 409, 413, 415, 507)),
]
