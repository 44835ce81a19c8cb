"""Factories that drive the API the way a client would."""

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import numpy as np
from aiohttp import ClientResponse, FormData
from aiohttp.test_utils import TestClient

from fltraining.storage.database import database_name, make_client
from fltraining.weights import dump_tensors
from routes.keys import models_key

_counter = itertools.count()
PASSWORD = "correct horse battery"


@dataclass
class Account:
    """A registered user with its token."""

    id: str
    username: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """Token authentication headers."""
        return {"Authorization": f"Token {self.token}"}


async def register(client: TestClient, username: str | None = None, **extra: Any) -> Account:
    """Register a user through the API."""
    name = username or f"user{next(_counter)}"
    response = await client.post("/api/users/", json={"username": name, "password": PASSWORD, **extra})
    assert response.status == 201, await response.text()
    body = await response.json()
    return Account(id=body["id"], username=name, token=body["token"])


def small_model() -> bytes:
    """A tiny valid model file (safetensors), the default upload."""
    return dump_tensors({"w": np.zeros(2, np.float32)})


def sized_model(size: int, seed: int = 0) -> bytes:
    """A valid safetensors model file of exactly `size` bytes (one uint8 tensor of random bytes)."""
    header = len(dump_tensors({"w": np.zeros(0, np.uint8)}))
    for payload in range(max(0, size - header - 16), size + 1):
        if len(content := dump_tensors({"w": np.zeros(payload, np.uint8)})) == size:
            data = np.random.default_rng(seed).integers(0, 256, payload, dtype=np.uint8)
            return dump_tensors({"w": data})
    raise ValueError(f"no safetensors file of exactly {size} bytes: {len(content)}")


async def upload_model(client: TestClient, owner: Account, content: bytes | None = None, **fields: str) -> str:
    """Upload a model through the API and return its id."""
    content = small_model() if content is None else content
    form = FormData()
    form.add_field("name", fields.get("name", "model"))
    form.add_field("description", fields.get("description", "a model"))
    if "input_shape" in fields:
        form.add_field("input_shape", fields["input_shape"])
    form.add_field("model_file", content, filename="model.pt", content_type="application/octet-stream")
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 201, await response.text()
    return str((await response.json())["model_id"])


async def create_training(client: TestClient, actor: Account, model_id: str | None = None, **body: Any) -> str:
    """Create a training through the API and return its id."""
    model_id = model_id or await upload_model(client, actor)
    payload = {"model_id": model_id, "target_num_updates": 3, **body}
    response = await client.post("/api/trainings/", json=payload, headers=actor.headers)
    assert response.status == 201, await response.text()
    return str((await response.json())["training_id"])


async def get_training(client: TestClient, account: Account, training_id: str) -> dict[str, Any]:
    """Fetch a training as JSON (asserting 200)."""
    response = await client.get(f"/api/trainings/{training_id}/", headers=account.headers)
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def training_total(client: TestClient, account: Account, path: str = "/api/trainings/") -> int:
    """The X-Total-Count of a training list (asserting 200)."""
    response = await client.get(path, headers=account.headers)
    assert response.status == 200, await response.text()
    return int(response.headers["X-Total-Count"])


async def stored_training(database_url: str, training_id: str) -> dict[str, Any] | None:
    """A training document exactly as MongoDB holds it, read with PyMongo."""
    mongo = make_client(database_url)
    try:
        collection = mongo[database_name(database_url, "fltraining")]["trainings"]
        return await collection.find_one({"_id": UUID(training_id)})
    finally:
        await mongo.close()


async def update_stored_training(database_url: str, training_id: str, **fields: Any) -> None:
    """Set fields of a stored training directly with PyMongo (states and times the API cannot reach)."""
    mongo = make_client(database_url)
    try:
        collection = mongo[database_name(database_url, "fltraining")]["trainings"]
        result = await collection.update_one({"_id": UUID(training_id)}, {"$set": fields})
        assert result.matched_count == 1
    finally:
        await mongo.close()


async def stored_blobs(client: TestClient) -> set[UUID]:
    """Ids of every blob in the service's blob store (whichever kind it is)."""
    far_future = datetime.now(UTC) + timedelta(days=1)
    return {file_id async for file_id in client.server.app[models_key].files.ids_older_than(far_future)}


async def blob_bytes(client: TestClient, file_id: UUID) -> bytes:
    """A stored blob's bytes, read from the blob store."""
    return b"".join([chunk async for chunk in await client.server.app[models_key].files.open_chunks(file_id)])


def staging_leftovers(client: TestClient) -> list[str]:
    """Staging files still on disk (a refused or interrupted upload must leave none)."""
    staging = client.server.app[models_key].files.staging.directory
    return sorted(path.name for path in staging.glob("*")) if staging.is_dir() else []


async def nothing_stored(client: TestClient) -> bool:
    """No blob and no staging file: what a refused upload must leave."""
    return not await stored_blobs(client) and not staging_leftovers(client)


async def next_frame(response: ClientResponse) -> dict[str, str] | None:
    """The next Server-Sent Events frame as field -> value (comments skipped); None at the end of the stream."""
    frame: dict[str, str] = {}
    while True:
        line = await response.content.readline()
        if not line:
            return None
        text = line.decode().rstrip("\r\n")
        if text == "":
            if frame:
                return frame
            continue
        if text.startswith(":"):
            continue
        name, _, value = text.partition(":")
        frame[name] = value.removeprefix(" ")
