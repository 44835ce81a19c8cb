"""The `gridfs` blob store: MongoDB GridFS, for deployments whose processes share no disk."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import gridfs.asynchronous.grid_file as _grid_file
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.storage.blobs import BlobMissing, BlobStore, BlobStoreKind, Staged, Staging, StoredFile
from fltraining.storage.queries import in_chunks

BUCKET = "model_files"
CHUNK_BYTES = 255 * 1024
UPLOAD_BATCH_BYTES = 1024 * 1024
# Chunks asked for per query: every reply stays far below MongoDB's 16 MiB message limit even on
# stores that answer a whole query in one reply (the embedded one does).
READ_BATCH_CHUNKS = 32

# PyMongo's GridIn collects chunks until 48 MB before inserting them, so every concurrent upload
# would hold that much (twice, once encoded); insert each megabyte as it arrives instead
# (pymongo is pinned; tests/test_slow_clients.py checks that the bound holds).
_grid_file._UPLOAD_BUFFER_SIZE = UPLOAD_BATCH_BYTES


class GridFSBlobStore(BlobStore):
    """Blobs in the GridFS bucket `model_files` of the service's database."""

    kind: BlobStoreKind = "gridfs"

    def __init__(self, database: AsyncDatabase[dict[str, Any]], staging: Staging) -> None:
        super().__init__(staging)
        self._bucket = AsyncGridFSBucket(database, bucket_name=BUCKET, chunk_size_bytes=CHUNK_BYTES)
        self._files = database[f"{BUCKET}.files"]
        self._chunks = database[f"{BUCKET}.chunks"]

    async def commit(self, staged: Staged) -> StoredFile:
        """Copy the staged file into GridFS a megabyte at a time, then drop it."""
        file_id = uuid4()
        stream = self._bucket.open_upload_stream_with_id(file_id, staged.path.name)
        try:
            with staged.path.open("rb") as source:
                while block := source.read(UPLOAD_BATCH_BYTES):
                    await stream.write(block)
        except BaseException:
            await stream.abort()
            raise
        finally:
            staged.path.unlink(missing_ok=True)
        await stream.close()
        return StoredFile(file_id, staged.size, staged.sha256)

    async def _file_length(self, file_id: UUID) -> tuple[int, int]:
        """A stored file's length and chunk size (BlobMissing when it is gone)."""
        entry = await self._files.find_one({"_id": file_id}, {"length": 1, "chunkSize": 1})
        if entry is None:
            raise BlobMissing(f"no blob with id {file_id}")
        return int(entry["length"]), int(entry["chunkSize"])

    async def _batch(self, file_id: UUID, first: int, count: int) -> list[bytes]:
        # Without a sort: an unsorted query is served from the (files_id, n) index by any MongoDB,
        # while the embedded store decodes every chunk of the bucket to sort.
        query = {"files_id": file_id, "n": {"$gte": first, "$lt": first + count}}
        found = {int(raw["n"]): bytes(raw["data"]) async for raw in self._chunks.find(query, {"n": 1, "data": 1})}
        if len(found) != count:
            raise BlobMissing(f"blob {file_id} lost chunks while it was read")
        return [found[n] for n in range(first, first + count)]

    async def open_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Check the blob exists now and return an iterator over its chunks, a bounded batch per query."""
        length, chunk_size = await self._file_length(file_id)
        count = -(-length // chunk_size)

        async def chunks() -> AsyncIterator[bytes]:
            for first in range(0, count, READ_BATCH_CHUNKS):
                for chunk in await self._batch(file_id, first, min(READ_BATCH_CHUNKS, count - first)):
                    yield chunk

        return chunks()

    def local_path(self, file_id: UUID) -> Path | None:
        """GridFS keeps nothing on this machine's disk."""
        return None

    @contextlib.asynccontextmanager
    async def local_copy(self, file_id: UUID) -> AsyncIterator[Path]:
        """Download the blob into a staging file, removed when the context ends."""
        path = self.staging.new_path()
        try:
            with path.open("wb") as out:
                async for chunk in await self.open_chunks(file_id):
                    await asyncio.to_thread(out.write, chunk)
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def delete(self, file_id: UUID) -> None:
        """Delete the file and its chunks; an already deleted one is fine."""
        try:
            await self._bucket.delete(file_id)
        except NoFile:
            pass

    async def delete_many(self, file_ids: list[UUID]) -> None:
        """Delete files and their chunks in two commands per piece, not two per file."""
        for chunk in in_chunks(file_ids):
            # Chunks first: a crash between leaves entries without chunks, which the sweeper still finds
            # (it lists entries) and deletes, while chunks without an entry would never be found.
            await self._chunks.delete_many({"files_id": {"$in": chunk}})
            await self._files.delete_many({"_id": {"$in": chunk}})

    async def ids_older_than(self, moment: datetime) -> AsyncIterator[UUID]:
        """Ids of complete files uploaded before a moment."""
        async for entry in self._bucket.find({"uploadDate": {"$lt": moment}}):
            yield entry._id
