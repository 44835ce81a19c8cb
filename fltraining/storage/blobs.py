"""The blob store interface: where model, update and SWAG statistic bytes live, beside the documents.

Every write goes through a local *staging* file first: the bytes are streamed to a temporary file
(hashed and counted on the way, refused past the size limit), inspected there if the caller needs
to, and only then committed to the store. A document names a blob only after its commit, so a
crash leaves at most an unreferenced staging file or blob, which the sweeper removes.
"""

import contextlib
import errno
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal
from uuid import UUID, uuid4

from fltraining.errors import InsufficientStorage, PayloadTooLarge

type BlobStoreKind = Literal["files", "gridfs"]

STAGING_DIR = "staging"
STAGING_SUFFIX = ".part"
# Writes are batched to this size: large enough for few system calls, small enough that an
# upload in flight holds next to nothing.
WRITE_BATCH_BYTES = 1024 * 1024


class BlobMissing(Exception):
    """A blob that is not (or no longer) in the store."""


@dataclass(frozen=True)
class StoredFile:
    """A committed blob: its id, size and SHA-256 (what documents record)."""

    file_id: UUID
    size: int
    sha256: str


@dataclass(frozen=True)
class Staged:
    """A finished write on local disk, not yet in the store."""

    path: Path
    size: int
    sha256: str


def disk_full(error: OSError) -> bool:
    """Whether an OS error means the disk (or the quota) is full."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn a full disk into 507 (Insufficient Storage); other OS errors stay what they are."""
    try:
        yield
    except OSError as error:
        if disk_full(error):
            raise InsufficientStorage("The server has no room to store this file right now.") from error
        raise


def open_for_writing(path: Path) -> BinaryIO:
    """Create a staging file for unbuffered writes (the writes are batched by the caller)."""
    return path.open("wb", buffering=0)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """Temporary files under one directory, for writes on their way into a blob store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def new_path(self) -> Path:
        """A fresh temporary file name (the file is not created)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{uuid4()}{STAGING_SUFFIX}"

    async def write(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Staged:
        """Stream chunks into a new staging file (413 past `max_bytes`, 507 when the disk is full)."""
        path = self.new_path()
        digest = hashlib.sha256()
        size = 0
        pending = bytearray()
        try:
            with storage_errors(), open_for_writing(path) as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"Model file is larger than {max_bytes} bytes.")
                    digest.update(chunk)
                    pending += chunk
                    if len(pending) >= WRITE_BATCH_BYTES:
                        # A local disk write of a megabyte is quicker than a thread hand-off.
                        out.write(pending)
                        pending.clear()
                out.write(pending)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Staged(path, size, digest.hexdigest())

    def leftovers(self, older_than: datetime) -> Iterator[Path]:
        """Staging files of writes that never finished (their process died), older than a moment."""
        if not self.directory.is_dir():
            return
        limit = older_than.timestamp()
        for path in self.directory.glob(f"*{STAGING_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < limit:
                    yield path


def staged_from_path(path: Path) -> Staged:
    """Describe a finished staging file the service wrote itself (its size and SHA-256)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(WRITE_BATCH_BYTES * 4):
            digest.update(block)
    return Staged(path, path.stat().st_size, digest.hexdigest())


def mtime_of(path: Path) -> datetime:
    """A file's modification time as an aware UTC datetime."""
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


class BlobStore(ABC):
    """One interface for every place blobs can live."""

    kind: BlobStoreKind

    def __init__(self, staging: Staging) -> None:
        self.staging = staging

    async def stage(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Staged:
        """Write a stream to local staging (413 past `max_bytes`, 507 when the disk is full)."""
        return await self.staging.write(chunks, max_bytes)

    async def put(self, chunks: AsyncIterator[bytes], max_bytes: int) -> StoredFile:
        """Store a stream as a new blob: staged, then committed."""
        return await self.commit(await self.stage(chunks, max_bytes))

    @abstractmethod
    async def commit(self, staged: Staged) -> StoredFile:
        """Turn a staged file into a durable blob (the staging file is gone afterwards)."""

    async def discard(self, staged: Staged) -> None:
        """Drop a staged file that will not be committed."""
        staged.path.unlink(missing_ok=True)

    @abstractmethod
    async def open_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Check a blob exists now (BlobMissing otherwise) and return an iterator over its bytes."""

    @abstractmethod
    def local_path(self, file_id: UUID) -> Path | None:
        """Where the blob is on this machine's disk, for stores that keep it there (else None)."""

    @abstractmethod
    def local_copy(self, file_id: UUID) -> contextlib.AbstractAsyncContextManager[Path]:
        """A local file holding the blob, to map into memory, for as long as the context lasts."""

    @abstractmethod
    async def delete(self, file_id: UUID) -> None:
        """Delete a blob; an already deleted one is fine."""

    async def delete_many(self, file_ids: list[UUID]) -> None:
        """Delete blobs no document names any more (already deleted ones are fine)."""
        for file_id in file_ids:
            await self.delete(file_id)

    @abstractmethod
    def ids_older_than(self, moment: datetime) -> AsyncIterator[UUID]:
        """Ids of committed blobs written before a moment (for the sweeper)."""

    async def sweep_staging(self, older_than: datetime) -> int:
        """Remove staging files that writes killed mid-way left behind; returns how many."""
        removed = 0
        for path in self.staging.leftovers(older_than):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
