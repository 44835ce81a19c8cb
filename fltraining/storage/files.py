"""Model bytes in GridFS, streamed in and out in chunks."""

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import gridfs.asynchronous.grid_file as _grid_file
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.errors import PayloadTooLarge

BUCKET = "model_files"
CHUNK_BYTES = 255 * 1024
UPLOAD_BATCH_BYTES = 1024 * 1024

# PyMongo's GridIn collects chunks until 48 MB before inserting them, so every concurrent upload
# would hold that much (twice, once encoded); insert each megabyte as it arrives instead
# (pymongo is pinned; tests/test_slow_clients.py checks that the bound holds).
_grid_file._UPLOAD_BUFFER_SIZE = UPLOAD_BATCH_BYTES


@dataclass(frozen=True)
class StoredFile:
    """What an upload wrote: its GridFS id, size and SHA-256."""

    file_id: UUID
    size: int
    sha256: str


class ModelFiles:
    """GridFS bucket holding model bytes."""

    def __init__(self, database: AsyncDatabase[dict[str, Any]]) -> None:
        self._bucket = AsyncGridFSBucket(database, bucket_name=BUCKET, chunk_size_bytes=CHUNK_BYTES)

    async def store(self, chunks: AsyncIterator[bytes], max_bytes: int, filename: str) -> StoredFile:
        """Stream chunks into a new file; over `max_bytes` the partial file is removed and 413 raised."""
        file_id = uuid4()
        digest = hashlib.sha256()
        size = 0
        stream = self._bucket.open_upload_stream_with_id(file_id, filename)
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"Model file is larger than {max_bytes} bytes.")
                digest.update(chunk)
                await stream.write(chunk)
        except BaseException:
            await stream.abort()
            raise
        await stream.close()
        return StoredFile(file_id=file_id, size=size, sha256=digest.hexdigest())

    async def store_bytes(self, data: bytes, filename: str) -> StoredFile:
        """Store bytes the service made itself (aggregated weights)."""

        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for start in range(0, len(view), UPLOAD_BATCH_BYTES):
                yield bytes(view[start : start + UPLOAD_BATCH_BYTES])

        return await self.store(chunks(), len(data), filename)

    async def read_all(self, file_id: UUID) -> bytearray:
        """A whole file in one buffer (its only copy in memory)."""
        stream = await self._bucket.open_download_stream(file_id)
        try:
            data = bytearray(stream.length)
            view = memoryview(data)
            offset = 0
            while chunk := await stream.readchunk():
                view[offset : offset + len(chunk)] = chunk
                offset += len(chunk)
            return data
        finally:
            await stream.close()

    async def read_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Yield a file's bytes chunk by chunk."""
        async for chunk in await self.open_chunks(file_id):
            yield chunk

    async def open_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Open a file now (NoFile if it is gone) and return an iterator over its chunks."""
        stream = await self._bucket.open_download_stream(file_id)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await stream.readchunk():
                    yield chunk
            finally:
                await stream.close()

        return chunks()

    async def ids_older_than(self, moment: datetime) -> AsyncIterator[UUID]:
        """Ids of complete files uploaded before a moment."""
        async for entry in self._bucket.find({"uploadDate": {"$lt": moment}}):
            yield entry._id

    async def delete(self, file_id: UUID) -> None:
        """Delete a file; an already deleted one is fine."""
        try:
            await self._bucket.delete(file_id)
        except NoFile:
            pass
