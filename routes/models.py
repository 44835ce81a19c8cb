"""Model endpoints: multipart upload streamed into GridFS, download, metadata, delete."""

from collections.abc import AsyncIterator, Awaitable
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from fltraining.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from fltraining.schemas.common import Message
from fltraining.schemas.models import ModelCreate, ModelMetadata, ModelUploadAccepted
from fltraining.storage.files import StoredFile
from routes.auth import current_user
from routes.keys import models_key, settings_key
from routes.parsing import BodyDeadline, path_uuid, validate
from routes.responses import detail, json_model, json_models
from routes.table import Endpoint

FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 1024 * 1024
FILE_FIELD = "model_file"
TEXT_FIELDS = {"name", "description", "input_shape"}
# Sent by DLR clients and accepted for compatibility; fltraining has no use for them.
IGNORED_FIELDS = {"round", "type", "owner"}


async def _read[T](deadline: BodyDeadline, pending: Awaitable[T]) -> T:
    """Await one read of the multipart body; a malformed body is the client's error (400)."""
    try:
        return await deadline.read(pending)
    except HttpProcessingError as error:
        raise InvalidInput(f"Malformed multipart body: {error.message}") from error
    except (ValueError, RuntimeError) as error:  # how aiohttp's multipart parser reports bad framing
        raise InvalidInput(f"Malformed multipart body: {error}") from error


async def _part_chunks(part: BodyPartReader, deadline: BodyDeadline) -> AsyncIterator[bytes]:
    """Yield a multipart part's bytes as they arrive."""
    while chunk := await _read(deadline, part.read_chunk(256 * 1024)):
        yield chunk


async def _part_text(part: BodyPartReader, deadline: BodyDeadline) -> str:
    """Read a small text field (400 past its limit)."""
    data = bytearray()
    while chunk := await _read(deadline, part.read_chunk(8192)):
        data += chunk
        if len(data) > FIELD_BYTES:
            raise InvalidInput(f"Field '{part.name}' is longer than {FIELD_BYTES} bytes.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(f"Field '{part.name}' is not UTF-8 text.") from error


async def upload_model(request: web.Request) -> web.Response:
    """POST /api/models/: multipart `name`, `description`, `model_file`, optional `input_shape`."""
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType("Upload a model as multipart/form-data.")
    service = request.app[models_key]
    settings = request.app[settings_key]
    limit = settings.max_model_bytes
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"Model file is larger than {limit} bytes.")
    fields: dict[str, Any] = {}
    stored: StoredFile | None = None
    deadline = BodyDeadline(settings.body_timeout_seconds, settings.upload_timeout_seconds)
    try:
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as error:
            raise InvalidInput(f"Malformed multipart body: {error}") from error
        while (part := await _read(deadline, reader.next())) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise InvalidInput("Nested or unnamed multipart parts are not accepted.")
            if part.name == FILE_FIELD:
                if stored is not None:
                    raise InvalidInput("Send one model_file only.")
                stored = await service.store_file(_part_chunks(part, deadline))
            elif part.name in TEXT_FIELDS:
                if part.name in fields:
                    raise InvalidInput(f"Field '{part.name}' may be sent once.")
                fields[part.name] = await _part_text(part, deadline)
            elif part.name in IGNORED_FIELDS:
                await _read(deadline, part.release())
            else:
                raise InvalidInput(f"Unknown field '{part.name[:64]}'.")
        if "name" not in fields:
            raise InvalidInput("Missing required field: name")
        if stored is None:
            raise InvalidInput("Missing required field: model_file")
        data = validate(ModelCreate, fields)
        model = await service.create(current_user(request), data, stored)
    except BaseException:
        if stored is not None:
            await service.discard_file(stored)
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
    """GET /api/models/{id}/: the bytes, streamed from GridFS."""
    service = request.app[models_key]
    model = await service.get_accessible(current_user(request), path_uuid(request, "model_id"))
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="model-{model.id}.pt"',
        "Content-Length": str(model.size),
        "ETag": f'"{model.sha256}"',
    })
    await response.prepare(request)
    async for chunk in service.read(model):
        await response.write(chunk)
    await response.write_eof()
    return response


async def delete_model(request: web.Request) -> web.Response:
    """DELETE /api/models/{id}/: its training goes with it."""
    await request.app[models_key].delete(current_user(request), path_uuid(request, "model_id"))
    return detail("Model removed!")


ENDPOINTS = [
    Endpoint("POST", "/api/models", upload_model, "Upload a model", "models", multipart=ModelCreate,
             responses={201: ModelUploadAccepted}, errors=(400, 413, 415), headers={201: ("Location",)}),
    Endpoint("GET", "/api/models", list_models, "Models the caller owns or reaches", "models",
             responses={200: [ModelMetadata]}),
    Endpoint("GET", "/api/models/{model_id}/metadata", metadata, "Model metadata", "models",
             responses={200: ModelMetadata}, errors=(403, 404)),
    Endpoint("GET", "/api/models/{model_id}", download, "Download model bytes", "models",
             responses={200: "application/octet-stream"}, errors=(403, 404),
             headers={200: ("Content-Disposition", "ETag")}),
    Endpoint("DELETE", "/api/models/{model_id}", delete_model, "Delete a model and its training", "models",
             responses={200: Message}, errors=(403, 404)),
]
