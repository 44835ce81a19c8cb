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


def parse_credentials(header: str) -> tuple[str, str, str] | None:
    """An Authorization header as ("token", token, "") or ("password", name, password); None when malformed.
    Token, Bearer and Basic with an empty password present a token."""
    if len(header) > MAX_HEADER:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if not credentials:
        return None
    if scheme in {"token", "bearer"}:
        return "token", credentials, ""
    if scheme != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, colon, password = decoded.partition(":")
    if not colon or not name:
        return None
    return ("token", name, "") if password == "" else ("password", name, password)


async def authenticate(users: UserService, header: str, address: str) -> User:
    """Resolve an Authorization header to a user, or raise 401."""
    parsed = parse_credentials(header)
    user: User | None = None
    if parsed is not None:
        kind, name, password = parsed
        user = await users.by_token(name, address) if kind == "token" else await users.by_password(
            name, password, address)
    if user is None:
        raise NotAuthenticated(INVALID)
    return user


def presented_token(header: str) -> str | None:
    """The token an Authorization header presents (Token, Bearer, or Basic with an empty password), if any."""
    parsed = parse_credentials(header)
    return parsed[1] if parsed is not None and parsed[0] == "token" else None


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
