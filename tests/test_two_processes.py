"""Two service processes on one database: no lost write, no rule applied twice."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fltraining.storage.embedded import EmbeddedStore
from tests.helpers import small_model
from tests.processes import ServiceProcess

PASSWORD = "two processes password"


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """One embedded store and two `fltraining serve` processes on it."""
    data = tmp_path_factory.mktemp("two")
    with EmbeddedStore(Path(data) / "store") as store:
        url = store.url.replace("/?", "/fltraining?")
        first = ServiceProcess(Path(data) / "a", env={"FLTRAINING_MONGODB_URL": url})
        second = ServiceProcess(Path(data) / "b", env={"FLTRAINING_MONGODB_URL": url})
        with first, second:
            yield first, second


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession() as client:
        yield client


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    """One request; status and JSON body."""
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def register(session: aiohttp.ClientSession, base: str, name: str) -> dict[str, Any]:
    """Register a user on one process."""
    status, body = await call(session, "POST", base + "/api/users/", json={"username": name, "password": PASSWORD})
    assert status == 201, body
    return dict(body)


async def new_training(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> str:
    """Upload a model and create a training on it."""
    form = aiohttp.FormData()
    form.add_field("name", "m")
    form.add_field("model_file", small_model(), filename="m.pt")
    async with session.post(base + "/api/models/", data=form, headers=headers) as response:
        model_id = (await response.json())["model_id"]
    status, body = await call(session, "POST", base + "/api/trainings/",
                              json={"model_id": model_id, "target_num_updates": 4}, headers=headers)
    assert status == 201, body
    return str(body["training_id"])


async def test_registrations_and_starts_split_across_two_processes(
    processes: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    bases = [process.base_url for process in processes]
    actor = await register(session, bases[0], "actor-split")
    headers = {"Authorization": f"Token {actor['token']}"}
    training_id = await new_training(session, bases[1], headers)
    users = await asyncio.gather(*(register(session, bases[i % 2], f"split-{i}") for i in range(100)))
    puts = await asyncio.gather(*(
        call(session, "PUT", f"{bases[i % 2]}/api/trainings/{training_id}/clients/",
             json={"clients": [user["id"]]}, headers=headers)
        for i, user in enumerate(users)
    ))
    assert Counter(status for status, _ in puts) == Counter({202: 100})
    starts = await asyncio.gather(*(
        call(session, "POST", f"{bases[i % 2]}/api/trainings/{training_id}/start/", headers=headers)
        for i in range(20)
    ))
    assert Counter(status for status, _ in starts) == Counter({202: 1, 409: 19})
    for base in bases:
        status, training = await call(session, "GET", f"{base}/api/trainings/{training_id}/", headers=headers)
        assert status == 200
        assert sorted(training["participants"]) == sorted(user["id"] for user in users)
        assert training["state"] == "O"
    # What a serial execution gives: one version per applied write (create, 100 PUTs, one start); while
    # uploads are counted, the tag also names the arrivals (none yet).
    async with session.get(f"{bases[0]}/api/trainings/{training_id}/", headers=headers) as response:
        assert response.headers["ETag"] == '"102.0"'


async def test_if_match_patches_across_two_processes_have_one_winner(
    processes: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    bases = [process.base_url for process in processes]
    actor = await register(session, bases[1], "actor-patch")
    headers = {"Authorization": f"Token {actor['token']}"}
    training_id = await new_training(session, bases[0], headers)
    async with session.get(f"{bases[0]}/api/trainings/{training_id}/", headers=headers) as response:
        etag = response.headers["ETag"]
    patches = await asyncio.gather(*(
        call(session, "PATCH", f"{bases[i % 2]}/api/trainings/{training_id}/",
             json={"target_num_updates": 10 + i}, headers={**headers, "If-Match": etag})
        for i in range(20)
    ))
    statuses = Counter(status for status, _ in patches)
    assert statuses == Counter({200: 1, 412: 19})
    winner = next(body for status, body in patches if status == 200)
    for base in bases:
        status, training = await call(session, "GET", f"{base}/api/trainings/{training_id}/", headers=headers)
        assert training["target_num_updates"] == winner["target_num_updates"]
        assert training == {**winner, "local_models_arrived": training["local_models_arrived"]}
