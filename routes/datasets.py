"""Data set endpoints: held-out `.npz` files the service evaluates global models on."""

from aiohttp import web

from fltraining.errors import InvalidInput, UnsupportedMediaType
from fltraining.schemas.common import Message
from fltraining.schemas.models import DatasetCreate, DatasetPublic
from routes.auth import current_user
from routes.keys import datasets_key
from routes.multipart import FormSpec, discard, read_form
from routes.parsing import media_type, path_uuid, validate
from routes.responses import detail, json_model, json_models
from routes.table import Endpoint

DATASET_FORM = FormSpec(files=frozenset({"dataset_file"}), texts=frozenset({"name"}))


async def upload_dataset(request: web.Request) -> web.Response:
    """POST /api/datasets/: multipart `name` and `dataset_file` (an .npz holding arrays x and y)."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("Upload a data set as multipart/form-data.")
    service = request.app[datasets_key]
    form = await read_form(request, DATASET_FORM, service.store_file, service.discard, service.max_bytes)
    try:
        if "dataset_file" not in form.files:
            raise InvalidInput("Missing required field: dataset_file")
        data = validate(DatasetCreate, form.texts)
        dataset = await service.create(current_user(request), data.name, form.files["dataset_file"])
    except BaseException:
        await discard(form, service.discard)
        raise
    return json_model(DatasetPublic.model_validate(dataset), status=201,
                      headers={"Location": f"/api/datasets/{dataset.id}/"})


async def list_datasets(request: web.Request) -> web.Response:
    """GET /api/datasets/: the caller's data sets."""
    datasets = await request.app[datasets_key].list_owned(current_user(request))
    return json_models([DatasetPublic.model_validate(dataset) for dataset in datasets])


async def get_dataset(request: web.Request) -> web.Response:
    """GET /api/datasets/{id}/."""
    dataset = await request.app[datasets_key].get_owned(current_user(request), path_uuid(request, "dataset_id"))
    return json_model(DatasetPublic.model_validate(dataset))


async def delete_dataset(request: web.Request) -> web.Response:
    """DELETE /api/datasets/{id}/."""
    await request.app[datasets_key].delete(current_user(request), path_uuid(request, "dataset_id"))
    return detail("Dataset removed!")


ENDPOINTS = [
    Endpoint("POST", "/api/datasets", upload_dataset, "Upload a held-out data set", "datasets",
             multipart=DatasetCreate, files=("dataset_file",), responses={201: DatasetPublic},
             errors=(400, 413, 415, 507), headers={201: ("Location",)}),
    Endpoint("GET", "/api/datasets", list_datasets, "The caller's data sets", "datasets",
             responses={200: [DatasetPublic]}),
    Endpoint("GET", "/api/datasets/{dataset_id}", get_dataset, "One data set of the caller's", "datasets",
             responses={200: DatasetPublic}, errors=(403, 404)),
    Endpoint("DELETE", "/api/datasets/{dataset_id}", delete_dataset, "Delete a data set", "datasets",
             responses={200: Message}, errors=(403, 404)),
]
