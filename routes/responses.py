"""Building JSON responses from public schemas (never from documents)."""

import os
import weakref
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from uuid import UUID

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETag
from bson.binary import UUID_SUBTYPE, Binary
from pydantic import BaseModel

from fltraining.schemas.common import iso_z
from fltraining.storage.blobs import BlobMissing, BlobStore


def json_model(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response holding one schema instance."""
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


def json_models(models: Sequence[BaseModel], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON array response of schema instances."""
    body = "[" + ",".join(model.model_dump_json() for model in models) + "]"
    return web.json_response(text=body, headers=headers)


def _encode_other(value: object) -> str:
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, Binary) and value.subtype == UUID_SUBTYPE:  # a UUID read raw (`reading_raw_uuids`)
        text = value.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    raise TypeError(f"{type(value).__name__} is not JSON")


def json_document(value: object, headers: dict[str, str] | None = None) -> web.Response:
    """Plain JSON data (objects, arrays) in one orjson pass: UUIDs (also raw BSON ones) as text, datetimes as
    the schemas write them (ISO 8601, milliseconds, `Z`)."""
    body = orjson.dumps(value, default=_encode_other, option=orjson.OPT_PASSTHROUGH_DATETIME)
    return web.Response(body=body, content_type="application/json", headers=headers)


def json_documents(items: Sequence[object], headers: dict[str, str] | None = None) -> web.Response:
    """A JSON array of plain objects (see `json_document`)."""
    return json_document(items, headers)


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


class BlobFileResponse(web.FileResponse):
    """aiohttp's sendfile response over an already open file (so a deletion after the lookup cannot
    turn the answer into a 404 or cut it short), with the blob's SHA-256 as its ETag when known."""

    def __init__(self, fd: int, sha256: str | None, headers: dict[str, str]) -> None:
        # aiohttp opens files by path; /proc/self/fd/N names the inode this descriptor holds, unlinked or not.
        super().__init__(f"/proc/self/fd/{fd}", headers=headers)
        self._blob_etag = sha256
        self._close_fd = weakref.finalize(self, os.close, fd)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the file, then let go of the descriptor (aiohttp's own prepare re-opens the file each call)."""
        if self.prepared:
            return self._payload_writer
        try:
            return await super().prepare(request)
        finally:
            self._close_fd()

    @property
    def etag(self) -> ETag | None:  # type: ignore[override]
        """The blob's SHA-256 when known, else aiohttp's own."""
        if self._blob_etag is not None:
            return ETag(value=self._blob_etag)
        return web.FileResponse.etag.fget(self)  # type: ignore[attr-defined]

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        if self._blob_etag is None:
            web.FileResponse.etag.fset(self, value)  # type: ignore[attr-defined]
        else:
            self._headers["ETag"] = f'"{self._blob_etag}"'


async def send_blob(
    request: web.Request, blobs: BlobStore, file_id: UUID, filename: str, size: int | None = None,
    sha256: str | None = None,
) -> web.StreamResponse:
    """A blob as an attachment: straight from its file with sendfile where the store keeps one on disk
    (returned unprepared, as aiohttp sends files), else streamed from the store (BlobMissing when it is gone)."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    path = blobs.local_path(file_id)
    if path is not None:
        try:
            return BlobFileResponse(os.open(path, os.O_RDONLY), sha256, headers)
        except FileNotFoundError:
            raise BlobMissing(f"no blob with id {file_id}") from None
    chunks = await blobs.open_chunks(file_id)
    known = {"Content-Length": None if size is None else str(size), "ETag": None if sha256 is None else f'"{sha256}"'}
    return await stream_file(request, chunks, filename, {name: value for name, value in known.items() if value})
