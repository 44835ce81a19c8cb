"""User endpoints."""

from aiohttp import web

from fltraining.errors import PermissionDenied
from fltraining.schemas.common import Message
from fltraining.schemas.trainings import TrainingListQuery, TrainingPublic
from fltraining.schemas.users import UserCreate, UserPublic, UserRegistered
from routes.auth import current_user
from routes.keys import settings_key, users_key
from routes.parsing import path_uuid, read_body
from routes.responses import detail, json_model, json_models
from routes.table import Endpoint
from routes.trainings import training_list


async def register(request: web.Request) -> web.Response:
    """POST /api/users/: open registration; the token is shown only here."""
    if not request.app[settings_key].registration_open:
        raise PermissionDenied("Registration is closed on this server.")
    data = await read_body(request, UserCreate)
    user, token = await request.app[users_key].register(data)
    body = UserRegistered.model_validate({**UserPublic.model_validate(user).model_dump(), "token": token})
    return json_model(body, status=201, headers={"Location": f"/api/users/{user.id}/"})


async def list_users(request: web.Request) -> web.Response:
    """GET /api/users/."""
    users = await request.app[users_key].list_all()
    return json_models([UserPublic.model_validate(user) for user in users])


async def myself(request: web.Request) -> web.Response:
    """GET /api/users/myself/."""
    return json_model(UserPublic.model_validate(current_user(request)))


async def delete_myself(request: web.Request) -> web.Response:
    """DELETE /api/users/myself/: the seed's cascades (trainings as actor, models, participations)."""
    await request.app[users_key].delete(current_user(request))
    return detail("User removed!")


async def get_user(request: web.Request) -> web.Response:
    """GET /api/users/{id}/."""
    user = await request.app[users_key].get(path_uuid(request, "user_id"))
    return json_model(UserPublic.model_validate(user))


async def my_trainings(request: web.Request) -> web.Response:
    """GET /api/users/trainings/: trainings where the caller is actor or participant."""
    return await training_list(request, as_participant=True)


ENDPOINTS = [
    Endpoint("POST", "/api/users", register, "Register a user", "users", public=True, body=UserCreate,
             responses={201: UserRegistered}, errors=(400, 403, 409, 413, 415), headers={201: ("Location",)}),
    Endpoint("GET", "/api/users", list_users, "List users", "users", responses={200: [UserPublic]}),
    Endpoint("GET", "/api/users/myself", myself, "The caller", "users", responses={200: UserPublic}),
    Endpoint("DELETE", "/api/users/myself", delete_myself, "Delete the caller and cascade", "users",
             responses={200: Message}),
    Endpoint("GET", "/api/users/trainings", my_trainings, "Trainings as actor or participant", "users",
             query=TrainingListQuery, responses={200: [TrainingPublic], 304: None}, errors=(400,),
             headers={200: ("X-Total-Count", "ETag"), 304: ("ETag",)}, request_headers=("If-None-Match",)),
    Endpoint("GET", "/api/users/{user_id}", get_user, "One user", "users",
             responses={200: UserPublic}, errors=(404,)),
]
