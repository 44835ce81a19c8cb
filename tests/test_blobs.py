"""The blob stores: large files, chunked GridFS reads, full disks, crash leftovers, sendfile downloads."""

import errno
import hashlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.settings import Settings
from fltraining.storage import blobs
from fltraining.storage.blob_files import FileBlobStore
from fltraining.storage.blob_gridfs import BUCKET, CHUNK_BYTES, READ_BATCH_CHUNKS, GridFSBlobStore
from fltraining.storage.blobs import BlobMissing, Staging
from routes.app import create_app
from routes.keys import models_key
from tests.helpers import nothing_stored, register, sized_model, small_model, stored_blobs, upload_model
from tests.test_models import model_form

MIB = 1024 * 1024
# MongoDB's largest message; the embedded store answers a whole query in one reply.
MONGODB_MAX_MESSAGE = 16 * MIB


def pattern(size: int, block: int = MIB) -> Iterator[bytes]:
    """`size` bytes of a non-repeating-per-block pattern, a block at a time."""
    for start in range(0, size, block):
        yield (start.to_bytes(8, "little") * (block // 8))[: min(block, size - start)]


async def streamed(size: int) -> AsyncIterator[bytes]:
    """The pattern as an async stream."""
    for block in pattern(size):
        yield block


async def test_a_100_mb_gridfs_blob_is_read_in_replies_under_16_mib(raw_db: AsyncDatabase[dict[str, Any]],
                                                                     tmp_path: Path) -> None:
    store = GridFSBlobStore(raw_db, Staging(tmp_path))
    size = 100 * MIB + 12345
    expected = hashlib.sha256()
    for block in pattern(size):
        expected.update(block)
    stored = await store.put(streamed(size), size)
    assert (stored.size, stored.sha256) == (size, expected.hexdigest())
    # Before chunked reads, the embedded store answered with one 100 MB reply (ProtocolError).
    assert READ_BATCH_CHUNKS * CHUNK_BYTES < MONGODB_MAX_MESSAGE
    digest = hashlib.sha256()
    async for chunk in await store.open_chunks(stored.file_id):
        digest.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    async with store.local_copy(stored.file_id) as path:
        assert path.stat().st_size == size
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # the local copy went with its context
    await store.delete(stored.file_id)
    assert await raw_db[f"{BUCKET}.chunks"].count_documents({"files_id": stored.file_id}) == 0
    with pytest.raises(BlobMissing):
        await store.open_chunks(stored.file_id)


async def test_files_blob_is_renamed_into_place_and_readable_after_unlink(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    stored = await store.put(streamed(3 * MIB), 4 * MIB)
    path = store.local_path(stored.file_id)
    assert path is not None and path.stat().st_size == 3 * MIB
    assert list((tmp_path / "blobs" / blobs.STAGING_DIR).iterdir()) == []
    chunks = await store.open_chunks(stored.file_id)
    await store.delete(stored.file_id)  # a reader that opened it keeps reading
    assert b"".join([chunk async for chunk in chunks]) == b"".join(pattern(3 * MIB))
    assert store.local_path(stored.file_id) is None
    with pytest.raises(BlobMissing):
        await store.open_chunks(stored.file_id)


class FullDisk:
    """A staging file whose writes fail as on a full disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def write(self, data: bytes) -> int:
        """Fail like a full disk."""
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


async def test_a_full_disk_answers_507_and_stores_nothing(client: TestClient, raw_db: AsyncDatabase[dict[str, Any]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    owner = await register(client)
    monkeypatch.setattr(blobs, "open_for_writing", FullDisk)
    response = await client.post("/api/models/", data=model_form(small_model()), headers=owner.headers)
    assert response.status == 507
    assert "no room" in (await response.json())["detail"]
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)
    monkeypatch.undo()
    await upload_model(client, owner)  # room again: uploads work


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs the right to mount, as root in CI has)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_a_real_full_disk_answers_507_and_leaves_room(aiohttp_client: Any, settings: Settings,
                                                            tiny_disk: Path) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"data_dir": tiny_disk})))
    owner = await register(client)
    response = await client.post("/api/models/", data=model_form(sized_model(3 * MIB)), headers=owner.headers)
    assert response.status == 507
    assert await nothing_stored(client)
    model_id = await upload_model(client, owner)  # the partial staging file was removed: there is room
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert await response.read() == small_model()


async def test_download_is_sent_from_the_file_with_ranges(client: TestClient, settings: Settings) -> None:
    owner = await register(client)
    content = sized_model(MIB + 7)
    model_id = await upload_model(client, owner, content)
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.headers["ETag"] == f'"{hashlib.sha256(content).hexdigest()}"'
    assert response.headers["Content-Length"] == str(len(content))
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert await response.read() == content
    if settings.blob_store == "files":  # ranged reads come with sendfile
        response = await client.get(f"/api/models/{model_id}/", headers={**owner.headers, "Range": "bytes=10-19"})
        assert response.status == 206
        assert await response.read() == content[10:20]


async def test_a_deleted_blob_answers_409_not_500(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    service = client.server.app[models_key]
    model = await service.get(uuid.UUID(model_id))
    await service.files.delete(model.file_id)  # as if an aggregation replaced it while we looked
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 409
    assert "try again" in (await response.json())["detail"]
    assert model.file_id not in await stored_blobs(client)

