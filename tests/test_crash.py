"""SIGKILL during writes: every acknowledged write survives a restart, nothing is half-applied,
no model points at missing or partial bytes."""

import asyncio
import hashlib
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fltraining.storage.database import make_client
from fltraining.storage.embedded import store_url
from fltraining.weights import dump_tensors
from tests.helpers import small_model
from tests.processes import ServiceProcess

PASSWORD = "crash test password"
PERIOD = 3
CONNECTIONS = 8


def children(pid: int) -> list[int]:
    """Direct child processes of a process (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    """One request; status and JSON body."""
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def prepare(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """An actor, one model (so every creation after the first clones it), a training, 80 users."""
    status, actor = await call(session, "POST", base + "/api/users/", json={"username": "actor", "password": PASSWORD})
    assert status == 201
    headers = {"Authorization": f"Token {actor['token']}"}
    form = aiohttp.FormData()
    form.add_field("name", "m")
    form.add_field("model_file", small_model(), filename="m.pt")
    async with session.post(base + "/api/models/", data=form, headers=headers) as response:
        model_id = (await response.json())["model_id"]
    status, body = await call(session, "POST", base + "/api/trainings/", headers=headers,
                              json={"model_id": model_id, "target_num_updates": 2})
    users = [await call(session, "POST", base + "/api/users/", json={"username": f"c{i}", "password": PASSWORD})
             for i in range(80)]
    return {"headers": headers, "model_id": model_id, "training_id": body["training_id"],
            "users": [user["id"] for _, user in users]}


async def fire(session: aiohttp.ClientSession, base: str, fixture: dict[str, Any], acknowledged: dict[str, list[Any]],
               kill_after: int, killed: asyncio.Event) -> None:
    """Creations and registrations from several connections until the service is killed."""
    pending_users = list(fixture["users"])

    async def worker(index: int) -> None:
        step = 0
        while not killed.is_set():
            step += 1
            try:
                if step % 2 and pending_users:
                    user_id = pending_users.pop()
                    status, _ = await call(session, "PUT", f"{base}/api/trainings/{fixture['training_id']}/clients/",
                                           json={"clients": [user_id]}, headers=fixture["headers"])
                    if status == 202:
                        acknowledged["participants"].append(user_id)
                else:
                    requested = 10 + index
                    status, body = await call(session, "POST", base + "/api/trainings/", headers=fixture["headers"],
                                              json={"model_id": fixture["model_id"], "target_num_updates": requested,
                                                    "options": {"daisy_chain_period": PERIOD}})
                    if status == 201:
                        acknowledged["trainings"].append((body["training_id"], requested))
            except (TimeoutError, aiohttp.ClientError):
                return  # the service died under this request: not acknowledged
            if len(acknowledged["trainings"]) + len(acknowledged["participants"]) >= kill_after:
                killed.set()

    await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))


@pytest.mark.parametrize("kill_after", [5, 25, 60])
async def test_sigkill_loses_no_acknowledged_write(tmp_path: Path, kill_after: int) -> None:
    data = tmp_path / "data"
    env = {"FLTRAINING_ORPHAN_GRACE_SECONDS": "0"}
    service = ServiceProcess(data, env=env)
    acknowledged: dict[str, list[Any]] = {"trainings": [], "participants": []}
    service.start()
    try:
        async with aiohttp.ClientSession() as session:
            fixture = await prepare(session, service.base_url)
            killed = asyncio.Event()
            load = asyncio.create_task(fire(session, service.base_url, fixture, acknowledged, kill_after, killed))
            await killed.wait()
            assert service.process is not None
            victims = [service.process.pid, *children(service.process.pid)]
            for pid in victims:  # the service and its store, both without a chance to clean up
                os.kill(pid, signal.SIGKILL)
            await load
    finally:
        service.stop()
    assert len(acknowledged["trainings"]) + len(acknowledged["participants"]) >= kill_after

    with ServiceProcess(data, env=env, embedded_port=service.embedded_port) as restarted:
        async with aiohttp.ClientSession() as session:
            headers = fixture["headers"]
            for training_id, requested in acknowledged["trainings"]:
                status, training = await call(session, "GET", f"{restarted.base_url}/api/trainings/{training_id}/",
                                              headers=headers)
                assert status == 200, f"acknowledged training {training_id} lost"
                assert training["target_num_updates"] == requested * PERIOD
                status, _ = await call(session, "GET", f"{restarted.base_url}/api/models/{training['model']}/metadata/",
                                       headers=headers)
                assert status == 200, "a training without its model"
            status, training = await call(session, "GET", f"{restarted.base_url}/api/trainings/{fixture['training_id']}/",
                                          headers=headers)
            assert set(acknowledged["participants"]) <= set(training["participants"])
            assert len(training["participants"]) == len(set(training["participants"]))
        # The restarted process's sweeper settles clones whose training never arrived.
        client = make_client(store_url("127.0.0.1", restarted.embedded_port))
        database = client["fltraining"]
        try:
            for _ in range(200):
                if await database.models.count_documents({"pending_training": {"$ne": None}}) == 0:
                    break
                await asyncio.sleep(0.05)  # waiting for the background sweep, bounded
            assert await database.models.count_documents({"pending_training": {"$ne": None}}) == 0
            used = set(await database.trainings.distinct("model"))
            clones = {model["_id"] async for model in database.models.find({"cloned_from": {"$ne": None}})}
            assert clones <= used, "a clone without its training"
            async for training in database.trainings.find({"options.daisy_chain_period": PERIOD}):
                assert training["target_num_updates"] == training["base_target_num_updates"] * PERIOD
        finally:
            await client.close()


async def upload_models(session: aiohttp.ClientSession, base: str, headers: dict[str, str],
                        acknowledged: dict[str, str], kill_after: int, killed: asyncio.Event) -> None:
    """Model uploads of a few MiB from several connections until the service is killed."""

    async def worker(index: int) -> None:
        step = 0
        while not killed.is_set():
            step += 1
            content = dump_tensors({"w": np.full((index + 1) * 2**17 + step, float(step), np.float32)})
            form = aiohttp.FormData()
            form.add_field("name", f"m{index}-{step}")
            form.add_field("model_file", content, filename="m.safetensors")
            try:
                async with session.post(base + "/api/models/", data=form, headers=headers) as response:
                    if response.status == 201:
                        acknowledged[(await response.json())["model_id"]] = hashlib.sha256(content).hexdigest()
            except (TimeoutError, aiohttp.ClientError):
                return  # the service died under this upload: not acknowledged
            if len(acknowledged) >= kill_after:
                killed.set()

    await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))


def blob_leftovers(data: Path) -> list[Path]:
    """Staging files on disk (partial uploads), whichever blob store ran."""
    return [path for folder in (data / "staging", data / "blobs" / "staging") if folder.is_dir()
            for path in folder.iterdir()]


async def stored_blob_ids(database: Any, data: Path) -> set[Any]:
    """Ids of every blob in either blob store: files under blobs/, GridFS files."""
    on_disk = {uuid.UUID(path.name) for path in (data / "blobs").glob("*-*-*-*-*")}
    in_gridfs = {entry["_id"] async for entry in database["model_files.files"].find({}, {"_id": 1})}
    return on_disk | in_gridfs


@pytest.mark.parametrize("kill_after", [3, 12])
async def test_sigkill_during_uploads_leaves_no_model_without_its_bytes(tmp_path: Path, kill_after: int) -> None:
    data = tmp_path / "data"
    env = {"FLTRAINING_ORPHAN_GRACE_SECONDS": "0", "FLTRAINING_SWEEP_INTERVAL_SECONDS": "0.2"}
    service = ServiceProcess(data, env=env)
    acknowledged: dict[str, str] = {}
    service.start()
    try:
        async with aiohttp.ClientSession() as session:
            status, actor = await call(session, "POST", service.base_url + "/api/users/",
                                       json={"username": "actor", "password": PASSWORD})
            assert status == 201
            headers = {"Authorization": f"Token {actor['token']}"}
            killed = asyncio.Event()
            load = asyncio.create_task(upload_models(session, service.base_url, headers, acknowledged,
                                                     kill_after, killed))
            await killed.wait()
            assert service.process is not None
            for pid in [service.process.pid, *children(service.process.pid)]:
                os.kill(pid, signal.SIGKILL)  # uploads are in flight on the other connections
            await load
    finally:
        service.stop()

    with ServiceProcess(data, env=env, embedded_port=service.embedded_port) as restarted:
        client = make_client(store_url("127.0.0.1", restarted.embedded_port))
        database = client["fltraining"]
        try:
            async with aiohttp.ClientSession() as session:
                stored = {str(model["_id"]): model async for model in database.models.find({})}
                assert set(acknowledged) <= set(stored), "an acknowledged model was lost"
                for model_id, model in stored.items():  # acknowledged or not: a document means whole bytes
                    async with session.get(f"{restarted.base_url}/api/models/{model_id}/", headers=headers) as response:
                        assert response.status == 200
                        body = await response.read()
                    assert (len(body), hashlib.sha256(body).hexdigest()) == (model["size"], model["sha256"])
                    if model_id in acknowledged:
                        assert model["sha256"] == acknowledged[model_id]
            referenced = {model["file_id"] for model in stored.values()}
            for _ in range(200):  # the restarted sweeper removes partial uploads and unnamed blobs
                if not blob_leftovers(data) and await stored_blob_ids(database, data) <= referenced:
                    break
                await asyncio.sleep(0.05)  # waiting for the background sweep, bounded
            assert blob_leftovers(data) == []
            assert await stored_blob_ids(database, data) == referenced
        finally:
            await client.close()
