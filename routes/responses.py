"""Building JSON responses from public schemas (never from documents)."""

from collections.abc import AsyncIterator, Sequence

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


async def stream_file(
    request: web.Request, chunks: AsyncIterator[bytes], filename: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Stream an opened file as an `application/octet-stream` attachment."""
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{filename}"',
        **(headers or {}),
    })
    await response.prepare(request)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response
