"""The `files` blob store: one file per blob under `FLTRAINING_DATA_DIR/blobs/`."""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from uuid import UUID, uuid4

from fltraining.storage.blobs import (
    STAGING_DIR,
    BlobMissing,
    BlobStore,
    BlobStoreKind,
    Staged,
    Staging,
    StoredFile,
    fsync_directory,
    mtime_of,
    storage_errors,
)

READ_BYTES = 1024 * 1024


def _durable_rename(source: Path, target: Path) -> None:
    # The bytes first, then the name: after a crash the blob is whole or absent, never partial.
    with source.open("rb") as staged:
        os.fsync(staged.fileno())
    os.rename(source, target)
    fsync_directory(target.parent)


class FileBlobStore(BlobStore):
    """Blobs as files named by their id; staging lives on the same file system, so a commit is a rename."""

    kind: BlobStoreKind = "files"

    def __init__(self, root: Path) -> None:
        super().__init__(Staging(root / STAGING_DIR))
        self.root = root

    def _path(self, file_id: UUID) -> Path:
        return self.root / str(file_id)

    async def commit(self, staged: Staged) -> StoredFile:
        """fsync the staged file and rename it into place."""
        file_id = uuid4()
        try:
            with storage_errors():
                await asyncio.to_thread(_durable_rename, staged.path, self._path(file_id))
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise
        return StoredFile(file_id, staged.size, staged.sha256)

    async def open_chunks(self, file_id: UUID) -> AsyncIterator[bytes]:
        """Open now (an unlink afterwards does not cut the read short) and read in 1 MiB steps."""
        try:
            source = self._path(file_id).open("rb")
        except FileNotFoundError:
            raise BlobMissing(f"no blob with id {file_id}") from None

        async def chunks() -> AsyncIterator[bytes]:
            with source:
                while block := await asyncio.to_thread(source.read, READ_BYTES):
                    yield block

        return chunks()

    def local_path(self, file_id: UUID) -> Path | None:
        """The blob's own file, when it exists."""
        path = self._path(file_id)
        return path if path.is_file() else None

    @contextlib.asynccontextmanager
    async def local_copy(self, file_id: UUID) -> AsyncIterator[Path]:
        """The blob's own file (no copy)."""
        path = self.local_path(file_id)
        if path is None:
            raise BlobMissing(f"no blob with id {file_id}")
        yield path

    async def delete(self, file_id: UUID) -> None:
        """Unlink the file (readers that opened it keep reading)."""
        self._path(file_id).unlink(missing_ok=True)

    async def ids_older_than(self, moment: datetime) -> AsyncIterator[UUID]:
        """Blob files whose last write is older than a moment."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            try:
                file_id = UUID(path.name)
            except ValueError:
                continue  # the staging folder, or a stranger's file
            with contextlib.suppress(FileNotFoundError):
                if mtime_of(path) < moment:
                    yield file_id
