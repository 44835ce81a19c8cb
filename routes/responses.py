"""Building JSON responses from public schemas (never from documents)."""

from collections.abc import Sequence

from aiohttp import web
from pydantic import BaseModel


def json_model(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response holding one schema instance."""
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


def json_models(models: Sequence[BaseModel], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON array response of schema instances."""
    body = "[" + ",".join(model.model_dump_json() for model in models) + "]"
    return web.json_response(text=body, headers=headers)


def detail(message: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A `{"detail": message}` response."""
    return web.json_response({"detail": message}, status=status, headers=headers)
