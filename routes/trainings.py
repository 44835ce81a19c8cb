"""Training endpoints."""

from typing import Any

from aiohttp import web

from fltraining.engine.arrivals import arrived_count, counted_outside
from fltraining.engine.plans import expected_count, privacy_report
from fltraining.schemas.common import Message
from fltraining.schemas.trainings import (
    ClientsBody,
    TrainingCreate,
    TrainingCreated,
    TrainingDetail,
    TrainingListQuery,
    TrainingPatch,
    TrainingPublic,
    public_training,
)
from routes.auth import current_user
from routes.conditional import REVALIDATE, list_etag, none_match, not_modified
from routes.keys import trainings_key
from routes.parsing import etag, if_match_version, path_uuid, read_body, read_query
from routes.responses import detail, json_document, json_documents, json_model
from routes.table import Endpoint

VERSION_PROJECTION = {"_id": 1, "version": 1}


def training_detail(raw: dict[str, Any], arrived: int) -> dict[str, Any]:
    """A stored training as the GET-by-id object: public fields plus what the current phase waits for."""
    detail = public_training(raw)
    if raw.get("phase") is not None:
        detail["local_models_arrived"] = arrived
        detail["local_models_expected"] = expected_count(raw)
    else:
        detail["local_models_arrived"] = 0
        detail["local_models_expected"] = len(raw["participants"])
    if (privacy := privacy_report(raw.get("options") or {}, raw.get("round", 0))) is not None:
        detail["privacy"] = privacy  # only differentially private trainings carry it
    return detail


def detail_etag(raw: dict[str, Any], arrived: int) -> str:
    """The detail's ETag: the version, and the arrivals while uploads are counted outside the document."""
    if counted_outside(raw):
        return f'"{raw["version"]}.{arrived}"'
    return etag(raw["version"])


async def _training_response(raw: dict[str, Any], arrived: int | None = None) -> web.Response:
    """A training's detail JSON with its ETag."""
    arrived = await arrived_count(raw) if arrived is None else arrived
    return json_document(training_detail(raw, arrived), headers={"ETag": detail_etag(raw, arrived), **REVALIDATE})


async def create_training(request: web.Request) -> web.Response:
    """POST /api/trainings/."""
    data = await read_body(request, TrainingCreate)
    training = await request.app[trainings_key].create(current_user(request), data)
    return json_model(TrainingCreated(training_id=training.id), status=201,
                      headers={"Location": f"/api/trainings/{training.id}/"})


async def training_list(request: web.Request, as_participant: bool) -> web.Response:
    """A page of the caller's trainings, built from projected documents in one encoding pass; with
    `If-None-Match`, ids and versions are read first, so an unchanged page costs a 304 and no more."""
    query = read_query(request, TrainingListQuery, repeatable=frozenset({"state"}))
    user = current_user(request)
    service = request.app[trainings_key]
    counted = None
    if "If-None-Match" in request.headers:
        versions, counted = await service.list_for(user, query, as_participant, VERSION_PROJECTION)
        tag = list_etag(user.id, request.query_string, counted, versions)
        if none_match(request, tag):
            return not_modified(tag, {"X-Total-Count": str(counted)})
    # Whole documents: on the embedded store a projection of the public fields costs more (36 vs 25 ms of
    # store CPU for 100) than reading them whole; the public fields are picked here.
    items, total = await service.list_for(user, query, as_participant, total=counted)
    tag = list_etag(user.id, request.query_string, total, items)
    headers = {"X-Total-Count": str(total), "ETag": tag, **REVALIDATE}
    return json_documents([public_training(item) for item in items], headers=headers)


async def list_trainings(request: web.Request) -> web.Response:
    """GET /api/trainings/: the caller's trainings as actor."""
    return await training_list(request, as_participant=False)


async def get_training(request: web.Request) -> web.Response:
    """GET /api/trainings/{id}/ (304 when `If-None-Match` names its current version)."""
    raw = await request.app[trainings_key].get_visible_raw(current_user(request), path_uuid(request, "training_id"))
    arrived = await arrived_count(raw)
    if none_match(request, tag := detail_etag(raw, arrived)):
        return not_modified(tag)
    return await _training_response(raw, arrived)


async def patch_training(request: web.Request) -> web.Response:
    """PATCH /api/trainings/{id}/ with optional If-Match."""
    training_id = path_uuid(request, "training_id")
    version = if_match_version(request)
    patch = await read_body(request, TrainingPatch)
    training = await request.app[trainings_key].patch(current_user(request), training_id, patch, version)
    return await _training_response(training.model_dump(by_alias=True))


async def delete_training(request: web.Request) -> web.Response:
    """DELETE /api/trainings/{id}/."""
    await request.app[trainings_key].delete(current_user(request), path_uuid(request, "training_id"))
    return detail("Training removed!")


async def add_clients(request: web.Request) -> web.Response:
    """PUT /api/trainings/{id}/clients/."""
    training_id = path_uuid(request, "training_id")
    body = await read_body(request, ClientsBody)
    await request.app[trainings_key].add_participants(current_user(request), training_id, body.clients)
    return detail("Users registered as participants!", status=202)


async def remove_clients(request: web.Request) -> web.Response:
    """DELETE /api/trainings/{id}/clients/."""
    training_id = path_uuid(request, "training_id")
    body = await read_body(request, ClientsBody)
    await request.app[trainings_key].remove_participants(current_user(request), training_id, body.clients)
    return detail("Users removed from training participants!")


async def start_training(request: web.Request) -> web.Response:
    """POST /api/trainings/{id}/start/."""
    await request.app[trainings_key].start(current_user(request), path_uuid(request, "training_id"))
    return detail("Training started!", status=202)


async def cancel_training(request: web.Request) -> web.Response:
    """POST /api/trainings/{id}/cancel/."""
    await request.app[trainings_key].cancel(current_user(request), path_uuid(request, "training_id"))
    return detail("Training cancelled!", status=202)


_ID = "/api/trainings/{training_id}"
ENDPOINTS = [
    Endpoint("POST", "/api/trainings", create_training, "Create a training", "trainings", body=TrainingCreate,
             responses={201: TrainingCreated}, errors=(400, 403, 413, 415), headers={201: ("Location",)}),
    Endpoint("GET", "/api/trainings", list_trainings, "The caller's trainings as actor", "trainings",
             query=TrainingListQuery, responses={200: [TrainingPublic], 304: None}, errors=(400,),
             headers={200: ("X-Total-Count", "ETag"), 304: ("ETag",)}, request_headers=("If-None-Match",)),
    Endpoint("GET", _ID, get_training, "One training", "trainings", responses={200: TrainingDetail, 304: None},
             errors=(403, 404), headers={200: ("ETag",), 304: ("ETag",)}, request_headers=("If-None-Match",)),
    Endpoint("PATCH", _ID, patch_training, "Change a training in state I", "trainings", body=TrainingPatch,
             responses={200: TrainingDetail}, errors=(400, 403, 404, 409, 412, 413, 415),
             headers={200: ("ETag",)}, request_headers=("If-Match",)),
    Endpoint("DELETE", _ID, delete_training, "Delete a training (its model stays)", "trainings",
             responses={200: Message}, errors=(403, 404)),
    Endpoint("PUT", _ID + "/clients", add_clients, "Register participants", "trainings", body=ClientsBody,
             responses={202: Message}, errors=(400, 403, 404, 409, 413, 415)),
    Endpoint("DELETE", _ID + "/clients", remove_clients, "Remove participants", "trainings", body=ClientsBody,
             responses={200: Message}, errors=(400, 403, 404, 409, 413, 415)),
    Endpoint("POST", _ID + "/start", start_training, "Start: I -> O", "trainings",
             responses={202: Message}, errors=(403, 404, 409)),
    Endpoint("POST", _ID + "/cancel", cancel_training, "Cancel: -> E", "trainings",
             responses={202: Message}, errors=(403, 404, 409)),
]
