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
        self._files = database[f"{BUCKET}.files"]
        self._chunks = database[f"{BUCKET}.chunks"]

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

    async def _file_length(self, file_id: UUID) -> tuple[int, int]:
        """A stored file's length and chunk size (NoFile when it is gone)."""
        entry = await self._files.find_one({"_id": file_id}, {"length": 1, "chunkSize": 1})
        if entry is None:
            raise NoFile(f"no file with id {file_id}")
        return int(entry["length"]), int(entry["chunkSize"])

    async def _unordered_chunks(self, file_id: UUID) -> AsyncIterator[tuple[int, bytes]]:
        # Without a sort: an unsorted equality query is served from the (files_id, n) index by
        # any MongoDB, while the embedded store decodes every chunk of the bucket to sort.
        async for chunk in self._chunks.find({"files_id": file_id}, {"n": 1, "data": 1}):
            yield int(chunk["n"]), bytes(chunk["data"])

    async def read_all(self, file_id: UUID) -> bytearray:
        """A whole file in one buffer (its only copy in memory)."""
        length, chunk_size = await self._file_length(file_id)
        data = bytearray(length)
        seen = 0
        async for n, chunk in self._unordered_chunks(file_id):
            data[n * chunk_size : n * chunk_size + len(chunk)] = chunk
            seen += len(chunk)
        if seen != length:
            raise NoFile(f"file {file_id} is incomplete ({seen} of {length} bytes)")
        return data

    async def read_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Yield a file's bytes chunk by chunk."""
        async for chunk in await self.open_chunks(file_id):
            yield chunk

    async def open_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Check a file exists now (NoFile otherwise) and return an iterator over its chunks, in order."""
        length, chunk_size = await self._file_length(file_id)
        count = -(-length // chunk_size)

        async def chunks() -> AsyncIterator[bytes]:
            # Chunks come in index (or insertion) order in practice; any that come early wait here.
            early: dict[int, bytes] = {}
            expected = 0
            async for n, chunk in self._unordered_chunks(file_id):
                early[n] = chunk
                while expected in early:
                    yield early.pop(expected)
                    expected += 1
            if expected != count:
                raise NoFile(f"file {file_id} lost chunks while it was read")

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
