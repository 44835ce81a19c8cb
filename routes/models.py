"""Model endpoints: multipart upload streamed into the blob store, download, metadata, delete."""

from aiohttp import web

from fltraining.engine.uploads import visible_file
from fltraining.errors import Conflict, InvalidInput, UnsupportedMediaType
from fltraining.schemas.common import Message
from fltraining.schemas.models import ModelCreate, ModelMetadata, ModelUploadAccepted
from fltraining.storage.blobs import BlobMissing
from routes.auth import current_user
from routes.keys import models_key
from routes.multipart import FormSpec, discard, read_form
from routes.parsing import media_type, path_uuid, validate
from routes.responses import detail, json_model, json_models, send_blob
from routes.table import Endpoint

UPLOAD_FORM = FormSpec(
    files=frozenset({"model_file"}),
    texts=frozenset({"name", "description"}),
    lists=frozenset({"input_shape"}),  # once as JSON, or repeated once per dimension (DLR's MNIST scripts)
    # Sent by DLR clients and accepted for compatibility; fltraining has no use for them.
    ignored=frozenset({"round", "type", "owner"}),
)


async def upload_model(request: web.Request) -> web.Response:
    """POST /api/models/: multipart `name`, `description`, `model_file`, optional `input_shape`."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("Upload a model as multipart/form-data.")
    service = request.app[models_key]
    form = await read_form(request, UPLOAD_FORM, service.store_file, service.discard_file, service.max_bytes)
    try:
        if "name" not in form.texts:
            raise InvalidInput("Missing required field: name")
        if "model_file" not in form.files:
            raise InvalidInput("Missing required field: model_file")
        data = validate(ModelCreate, {**form.texts, **form.lists})
        model = await service.create(current_user(request), data, form.files["model_file"])
    except BaseException:
        await discard(form, service.discard_file)
        raise
    return json_model(ModelUploadAccepted(model_id=model.id), status=201,
                      headers={"Location": f"/api/models/{model.id}/metadata/"})


async def list_models(request: web.Request) -> web.Response:
    """GET /api/models/."""
    models = await request.app[models_key].list_accessible(current_user(request))
    return json_models([ModelMetadata.model_validate(model) for model in models])


async def metadata(request: web.Request) -> web.Response:
    """GET /api/models/{id}/metadata/."""
    model = await request.app[models_key].get_accessible(current_user(request), path_uuid(request, "model_id"))
    return json_model(ModelMetadata.model_validate(model))


async def download(request: web.Request) -> web.StreamResponse:
    """GET /api/models/{id}/: the bytes of a global model or a local update, from the blob store."""
    service = request.app[models_key]
    model_id = path_uuid(request, "model_id")
    for attempt in range(2):
        ref = await visible_file(service, current_user(request), model_id)
        try:
            return await send_blob(request, service.files, ref.file_id, f"model-{model_id}.pt", ref.size, ref.sha256)
        except BlobMissing:
            if attempt:  # an aggregation replaced the weights twice while we looked: the client may retry
                raise Conflict("The model changed while it was being read; try again.") from None
    raise AssertionError("unreachable")


async def delete_model(request: web.Request) -> web.Response:
    """DELETE /api/models/{id}/: its training goes with it."""
    await request.app[models_key].delete(current_user(request), path_uuid(request, "model_id"))
    return detail("Model removed!")


ENDPOINTS = [
    Endpoint("POST", "/api/models", upload_model, "Upload a model", "models", multipart=ModelCreate,
             responses={201: ModelUploadAccepted}, errors=(400, 413, 415, 507), headers={201: ("Location",)}),
    Endpoint("GET", "/api/models", list_models, "Models the caller owns or reaches", "models",
             responses={200: [ModelMetadata]}),
    Endpoint("GET", "/api/models/{model_id}/metadata", metadata, "Model metadata", "models",
             responses={200: ModelMetadata}, errors=(403, 404)),
    Endpoint("GET", "/api/models/{model_id}", download, "Download model bytes", "models",
             responses={200: "application/octet-stream"}, errors=(403, 404, 409),
             headers={200: ("Content-Disposition", "ETag")}),
    Endpoint("DELETE", "/api/models/{model_id}", delete_model, "Delete a model and its training", "models",
             responses={200: Message}, errors=(403, 404)),
]
