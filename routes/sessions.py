"""Sign-in and sign-out: a token of its own per sign-in (the dashboard's), which expires."""

from aiohttp import web

from fltraining.errors import InvalidInput
from fltraining.schemas.common import Message
from fltraining.schemas.users import SessionStarted, UserPublic
from routes.auth import current_user, presented_token
from routes.keys import users_key
from routes.responses import detail, json_model
from routes.table import Endpoint

NOT_A_SESSION = "These credentials are no sign-in token; only a token from POST /api/sessions/ can be signed out."


async def sign_in(request: web.Request) -> web.Response:
    """POST /api/sessions/: a new sign-in token for the caller (password logins are throttled as always)."""
    user = current_user(request)
    session, token = await request.app[users_key].start_session(user)
    body = SessionStarted(token=token, expires_at=session.expires_at, user=UserPublic.model_validate(user))
    return json_model(body, status=201)


async def sign_out(request: web.Request) -> web.Response:
    """DELETE /api/sessions/: end the sign-in whose token authenticated this request."""
    token = presented_token(request.headers.get("Authorization", ""))
    if token is None or not await request.app[users_key].end_session(current_user(request), token):
        raise InvalidInput(NOT_A_SESSION)
    return detail("Signed out.")


ENDPOINTS = [
    Endpoint("POST", "/api/sessions", sign_in, "Sign in: a token of its own for this sign-in", "users",
             responses={201: SessionStarted}, errors=(429,),
             description="Authenticate with Basic credentials (user name and password) as on every call; the "
                         "answer holds a new token for `Authorization: Token <token>` that expires after "
                         "`FLTRAINING_SESSION_HOURS`. The dashboard signs in this way."),
    Endpoint("DELETE", "/api/sessions", sign_out, "Sign out: end the sign-in of this token", "users",
             responses={200: Message}, errors=(400,)),
]
