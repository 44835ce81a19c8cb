"""Authentication: Token, Bearer, Basic with password, and Basic with a token as user name."""

import base64
import binascii
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from fltraining.documents import User
from fltraining.errors import NotAuthenticated
from fltraining.services.users import UserService
from routes.keys import user_key, users_key

MISSING = "Authentication credentials were not provided."
INVALID = "Invalid credentials."
MAX_HEADER = 4096

PublicCheck = Callable[[web.Request], bool]


async def authenticate(users: UserService, header: str, address: str) -> User:
    """Resolve an Authorization header to a user, or raise 401."""
    if len(header) > MAX_HEADER:
        raise NotAuthenticated(INVALID)
    scheme, _, credentials = header.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    user: User | None = None
    if scheme in {"token", "bearer"} and credentials:
        user = await users.by_token(credentials, address)
    elif scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as error:
            raise NotAuthenticated(INVALID) from error
        name, colon, password = decoded.partition(":")
        if not colon or not name:
            raise NotAuthenticated(INVALID)
        user = await users.by_token(name, address) if password == "" else await users.by_password(name, password, address)
    if user is None:
        raise NotAuthenticated(INVALID)
    return user


def presented_token(header: str) -> str | None:
    """The token an Authorization header presents (Token, Bearer, or Basic with an empty password), if any."""
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() in {"token", "bearer"}:
        return credentials or None
    if scheme.lower() == "basic":
        try:
            name, colon, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return name if colon and name and password == "" else None
    return None


def current_user(request: web.Request) -> User:
    """The authenticated caller of a protected handler."""
    return request[user_key]


def make_auth_middleware(public_check: PublicCheck) -> Middleware:
    """Middleware that authenticates every non-public route."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if public_check(request):
            # No handler of a public route reads the caller: credentials sent along are ignored
            # (no password verification, no failed-login count on /health).
            return await handler(request)
        header = request.headers.get("Authorization")
        if not header:
            raise NotAuthenticated(MISSING)
        request[user_key] = await authenticate(request.app[users_key], header, request.remote or "unknown")
        return await handler(request)

    return auth_middleware
