"""Simulated FL clients: each receives notifications on its own aiohttp server, trains, uploads and tests."""

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from fltraining.weights import dump_tensors, load_tensors
from tests.helpers import PASSWORD, Account

_names = itertools.count()

WAIT_SECONDS = 60.0
POLL_SECONDS = 0.05

GLOBAL_TENSORS = {"layer.weight": np.zeros((3, 2), np.float32), "layer.bias": np.zeros(3, np.float32)}


def model_bytes(tensors: dict[str, np.ndarray] | None = None) -> bytes:
    """A safetensors model file (by default the small model the simulated clients train)."""
    return dump_tensors(tensors or GLOBAL_TENSORS)


@dataclass
class SimulatedClient:
    """A participant that does what each notification asks, unless told to answer otherwise."""

    api: TestClient
    account: Account
    index: int
    sample_size: int = 1
    answer_status: int | None = None  # answer every notification with this status instead of working
    silent: bool = False  # accept notifications but never upload (a client that went away)
    received: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[tuple[int, str]] = field(default_factory=list)  # (round, model id trained)
    errors: list[str] = field(default_factory=list)
    server: TestServer | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    delta: Callable[[int, int], float] = lambda index, round_: float(index + 1)

    @property
    def endpoint(self) -> str:
        """Where this client receives notifications."""
        assert self.server is not None
        return str(self.server.make_url("/"))

    async def _notified(self, request: web.Request) -> web.Response:
        message = await request.json()
        self.received.append(message)
        if self.answer_status is not None:
            return web.Response(status=self.answer_status)
        kind = message["notification_type"]
        work: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "UPDATE_ROUND_START": self.train, "MODEL_TEST_ROUND": self.test, "SWAG_ROUND_START": self.swag,
        }
        if kind in work and not self.silent:
            task = asyncio.create_task(self._run(work[kind], message["body"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return web.Response(status=202)
        return web.Response(status=200)

    async def _run(self, job: Callable[[dict[str, Any]], Awaitable[None]], body: dict[str, Any]) -> None:
        try:
            await job(body)
        except Exception as error:  # surfaced by the test through `errors`
            self.errors.append(f"{type(error).__name__}: {error}")

    async def download(self, model_id: str) -> dict[str, np.ndarray]:
        """GET a model's bytes and read them."""
        response = await self.api.get(f"/api/models/{model_id}/", headers=self.account.headers)
        assert response.status == 200, await response.text()
        return {name: np.array(value) for name, value in load_tensors(await response.read()).items()}

    async def train(self, body: dict[str, Any]) -> None:
        """Download the model named, add this client's delta, upload it as the round's update."""
        model_id, round_ = body["global_model_uuid"], body["round"]
        tensors = await self.download(model_id)
        trained = {name: value + np.float32(self.delta(self.index, round_)) for name, value in tensors.items()}
        form = FormData()
        form.add_field("owner", self.account.id)
        form.add_field("round", str(round_))
        form.add_field("sample_size", str(self.sample_size))
        form.add_field("metric_names", "loss")
        form.add_field("metric_values", str(1.0 / (round_ + 1)))
        form.add_field("model_file", dump_tensors(trained), filename="model_file")
        response = await self.api.post(f"/api/models/{model_id}/", data=form, headers=self.account.headers)
        assert response.status == 201, f"{response.status} {await response.text()}"
        self.uploads.append((round_, model_id))

    async def test(self, body: dict[str, Any]) -> None:
        """Post test metrics for the global model."""
        payload = {"metric_names": ["accuracy"], "metric_values": [0.5 + self.index / 100]}
        response = await self.api.post(f"/api/models/{body['global_model_uuid']}/metrics/", json=payload,
                                       headers=self.account.headers)
        assert response.status == 201, await response.text()

    async def swag(self, body: dict[str, Any]) -> None:
        """Post SWAG moments derived from the global model (first = w + i, second = (w + i)²)."""
        tensors = await self.download(body["global_model_uuid"])
        first = {name: value + np.float32(self.index) for name, value in tensors.items()}
        second = {name: value * value for name, value in first.items()}
        form = FormData()
        form.add_field("round", str(body["round"]))
        form.add_field("sample_size", str(self.sample_size))
        form.add_field("first_moment_file", dump_tensors(first), filename="first")
        form.add_field("second_moment_file", dump_tensors(second), filename="second")
        response = await self.api.post(f"/api/models/{body['global_model_uuid']}/swag/", data=form,
                                       headers=self.account.headers)
        assert response.status == 201, await response.text()

    def types(self) -> list[str]:
        """The notification types received, in order."""
        return [message["notification_type"] for message in self.received]


async def register_client(api: TestClient, endpoint: str) -> Account:
    """Register a client user whose notifications go to `endpoint`."""
    name = f"client{next(_names)}"
    payload = {"username": name, "password": PASSWORD, "client": True, "message_endpoint": endpoint}
    response = await api.post("/api/users/", json=payload)
    assert response.status == 201, await response.text()
    body = await response.json()
    return Account(id=body["id"], username=name, token=body["token"])


async def start_clients(api: TestClient, count: int, **options: Any) -> list[SimulatedClient]:
    """Register `count` client users, each with its own notification server."""
    clients = []
    for index in range(count):
        client = SimulatedClient(api=api, account=Account("", "", ""), index=index, **options)
        app = web.Application()
        app.router.add_post("/", client._notified)
        client.server = TestServer(app, host="127.0.0.1")
        await client.server.start_server()
        client.account = await register_client(api, client.endpoint)
        clients.append(client)
    return clients


async def stop_clients(clients: list[SimulatedClient]) -> None:
    """Shut the notification servers down."""
    for client in clients:
        for task in list(client.tasks):
            task.cancel()
        if client.server is not None:
            await client.server.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, seconds: float = WAIT_SECONDS
) -> None:
    """Poll a condition until it holds (fails the test after `seconds`)."""
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(POLL_SECONDS)


async def wait_for_notification(clients: list[SimulatedClient], kind: str, count: int = 1) -> None:
    """Wait until every client has received `count` notifications of a type."""

    async def arrived() -> bool:
        return all(client.types().count(kind) >= count for client in clients)

    try:
        await wait_until(arrived, kind)
    except TimeoutError:
        raise AssertionError(f"not every client received {kind}: {[c.types() for c in clients]}") from None


async def wait_for_state(api: TestClient, account: Account, training_id: str, states: set[str],
                         seconds: float = WAIT_SECONDS) -> dict[str, Any]:
    """Poll a training until it reaches one of `states`; returns it."""
    latest: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal latest
        response = await api.get(f"/api/trainings/{training_id}/", headers=account.headers)
        latest = await response.json()
        return latest["state"] in states

    try:
        await wait_until(reached, f"state in {states}", seconds)
    except TimeoutError:
        raise AssertionError(f"training never reached {states}; last seen: {latest}") from None
    return latest


# -- helpers for tests against real service processes (appended) ------------------------------

import aiohttp


ENDED_STATES = {"C", "E"}


async def audit_trail(api: Any, account: Account, training_id: str) -> list[dict[str, Any]]:
    """A training's whole audit trail; for an ended training, once the events of its last step are written
    (a step's events follow its commit and its notifications: the event stream ends only once they are)."""
    detail = await (await api.get(f"/api/trainings/{training_id}/", headers=account.headers)).json()
    if detail.get("state") in ENDED_STATES:
        async with asyncio.timeout(WAIT_SECONDS):
            stream = await api.get(f"/api/trainings/{training_id}/events/",
                                   headers={**account.headers, "Accept": "text/event-stream"})
            assert stream.status == 200, await stream.text()
            await stream.read()  # the stream of an ended training ends once its events are all written
    response = await api.get(f"/api/trainings/{training_id}/events/?limit=1000", headers=account.headers)
    assert response.status == 200, await response.text()
    return list(await response.json())


class HttpApi:
    """A service process reached over HTTP, used like the TestClient (`await api.get(path)`).

    Each answer's body is read before it is returned, so the connection goes back to the pool and
    `.json()` / `.text()` / `.read()` still work on the response afterwards.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession(base_url=base_url)

    async def request(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """One request; the answer with its body already read."""
        response = await self.session.request(method, path, **kwargs)
        await response.read()  # reading the whole body gives the connection back
        return response

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """GET `path`."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """POST `path`."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """PUT `path`."""
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """PATCH `path`."""
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """DELETE `path`."""
        return await self.request("DELETE", path, **kwargs)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.session.close()


async def take_notifications_down(client: SimulatedClient) -> int:
    """Stop a client's notification server (connections are refused); returns its port."""
    assert client.server is not None and client.server.port is not None
    port = int(client.server.port)
    await client.server.close()
    return port


async def bring_notifications_up(client: SimulatedClient, port: int) -> None:
    """Serve a client's notifications again on `port` (its registered endpoint)."""
    app = web.Application()
    app.router.add_post("/", client._notified)
    client.server = TestServer(app, host="127.0.0.1", port=port)
    await client.server.start_server()


# --- Helpers for round-flow tests (additions; nothing above depends on them) -------------------


async def start_actor(api: TestClient) -> SimulatedClient:
    """An actor user with its own notification server; it records what it receives and does no work."""
    actor = SimulatedClient(api=api, account=Account("", "", ""), index=-1, silent=True)
    app = web.Application()
    app.router.add_post("/", actor._notified)
    actor.server = TestServer(app, host="127.0.0.1")
    await actor.server.start_server()
    name = f"actor{next(_names)}"
    payload = {"username": name, "password": PASSWORD, "actor": True, "message_endpoint": actor.endpoint}
    response = await api.post("/api/users/", json=payload)
    assert response.status == 201, await response.text()
    body = await response.json()
    actor.account = Account(id=body["id"], username=name, token=body["token"])
    return actor


async def assert_stays(check: Callable[[], Awaitable[bool]], what: str, seconds: float) -> None:
    """Poll a condition for `seconds` and fail as soon as it does not hold (to assert that nothing happens)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        assert await check(), f"no longer true: {what}"
        await asyncio.sleep(POLL_SECONDS)
    assert await check(), f"no longer true: {what}"


async def post_update(client: SimulatedClient, model_id: str, round_: int, tensors: dict[str, np.ndarray]) -> int:
    """Upload an update as `client` without asserting the answer; returns the HTTP status."""
    form = FormData()
    form.add_field("round", str(round_))
    form.add_field("sample_size", str(client.sample_size))
    form.add_field("model_file", dump_tensors(tensors), filename="model_file")
    response = await client.api.post(f"/api/models/{model_id}/", data=form, headers=client.account.headers)
    await response.read()
    return response.status
