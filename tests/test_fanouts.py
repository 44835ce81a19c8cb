"""Notifications as fan-outs at scale: 300 receivers per record, faults in the middle of a fan-out.

The receivers are one notification server with a path per receiver (`/r/<index>`), so hundreds of
participants cost the test little; users are written straight into the store (a password hash per
user would take the test longer than the rounds). Behaviour, not timing: no figure here is a speed.
"""

import asyncio
import hashlib
import os
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import numpy as np
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.clock import utcnow
from fltraining.documents import User
from fltraining.engine.outbox import purge_settled
from fltraining.settings import Settings
from fltraining.storage.database import database_name, init_database, make_client
from fltraining.storage.embedded import EmbeddedStore
from fltraining.weights import dump_tensors, load_tensors
from routes.app import create_app
from tests.conftest import TEST_URL_VARIABLE, with_database
from tests.fl_clients import GLOBAL_TENSORS, HttpApi, model_bytes, wait_for_state, wait_until
from tests.helpers import Account, create_training, register, upload_model
from tests.processes import ServiceProcess
from tests.test_rounds import events_of

RECEIVERS = 300
KILLED_RECEIVERS = 150  # enough for a fan-out half delivered at 64 receivers in parallel
SECONDS = 180.0
Api = TestClient | HttpApi


@dataclass
class Receivers:
    """Notification receivers behind one server: what each got, in order, and how each answers."""

    got: defaultdict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    status: dict[int, int] = field(default_factory=dict)  # answer this instead of 202 to round notifications
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # answers wait while it is clear
    on_round: Callable[[int, dict[str, Any]], Awaitable[None]] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    server: TestServer | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def handle(self, request: web.Request) -> web.Response:
        """Record the notification, then answer (after the gate opens)."""
        key = request.match_info["key"]
        index = -1 if key == "actor" else int(key)
        message = await request.json()
        self.got[index].append(message["notification_type"])
        await self.gate.wait()
        if message["notification_type"] == "UPDATE_ROUND_START":
            if index in self.status:
                return web.Response(status=self.status[index])
            if self.on_round is not None:
                task = asyncio.create_task(self._work(index, message["body"]))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        return web.Response(status=202)

    async def _work(self, index: int, body: dict[str, Any]) -> None:
        assert self.on_round is not None
        try:
            await self.on_round(index, body)
        except Exception as error:  # surfaced by the test
            self.errors.append(f"{index}: {type(error).__name__}: {error}")

    def url(self, key: str) -> str:
        """A receiver's message endpoint."""
        assert self.server is not None
        return str(self.server.make_url(f"/r/{key}"))

    def first(self, index: int, kind: str) -> int:
        """Where a receiver first got a notification type (in its own order)."""
        return self.got[index].index(kind)

    def last(self, index: int, kind: str) -> int:
        """Where a receiver last got a notification type."""
        return len(self.got[index]) - 1 - self.got[index][::-1].index(kind)


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    """A running receivers' server."""
    found = Receivers()
    app = web.Application()
    app.router.add_post("/r/{key}", found.handle)
    found.server = TestServer(app, host="127.0.0.1")
    await found.server.start_server()
    yield found
    found.gate.set()
    for task in list(found.tasks):
        task.cancel()
    await found.server.close()


async def insert_clients(database: AsyncDatabase[dict[str, Any]], receivers: Receivers, count: int) -> list[Account]:
    """`count` client users whose notifications go to the receivers, written in one insert."""
    accounts, documents = [], []
    for index in range(count):
        token = secrets.token_hex(20)
        user = User(username=f"fan{index}-{uuid4().hex[:6]}", client=True, message_endpoint=receivers.url(str(index)),
                    password_hash="not a password hash: these users only use tokens",
                    token_hash=hashlib.sha256(token.encode()).hexdigest())
        documents.append(user.model_dump(by_alias=True))
        accounts.append(Account(str(user.id), user.username, token))
    await database["users"].insert_many(documents)
    return accounts


def trainer(api: Api, accounts: list[Account]) -> Callable[[int, dict[str, Any]], Awaitable[None]]:
    """What a receiver does when told to train: download the model named, add index % 5 + 1, upload."""

    async def train(index: int, body: dict[str, Any]) -> None:
        headers, model_id = accounts[index].headers, body["global_model_uuid"]
        response = await api.get(f"/api/models/{model_id}/", headers=headers)
        assert response.status == 200, response.status
        tensors = load_tensors(await response.read())
        form = FormData()
        form.add_field("round", str(body["round"]))
        form.add_field("sample_size", "1")
        form.add_field("model_file", dump_tensors({name: np.asarray(value) + np.float32(index % 5 + 1)
                                                   for name, value in tensors.items()}), filename="model_file")
        response = await api.post(f"/api/models/{model_id}/", data=form, headers=headers)
        assert response.status == 201, await response.text()

    return train


async def start(api: Api, actor: Account, accounts: list[Account], **fields: Any) -> str:
    """A training of all the accounts on the simulated clients' model, started; returns its id."""
    http = cast(Any, api)
    model_id = await upload_model(http, actor, model_bytes())
    training_id = await create_training(http, actor, model_id, clients=[a.id for a in accounts], **fields)
    response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 202, await response.text()
    return training_id


@pytest.fixture
async def own_store(tmp_path: Path, store_url: str) -> AsyncIterator[str]:
    """A database of its own for a heavy test: on the embedded store a fresh store process (its load stays
    out of the suite's shared one), else a fresh database on the MongoDB under test."""
    if os.environ.get(TEST_URL_VARIABLE):
        url = with_database(store_url, f"fltraining_fanout_{uuid4().hex[:12]}")
        yield url
        mongo = make_client(url)
        await mongo.drop_database(database_name(url, "fltraining"))
        await mongo.close()
        return
    with EmbeddedStore(tmp_path / "own-store") as embedded:
        yield embedded.url.replace("/?", "/fanout?")


@pytest.fixture
async def heavy_api(own_store: str, aiohttp_client: Any, engine_settings: Settings) -> TestClient:
    """The round-engine test service on its own database (the store named first: set up before the service and
    torn down after it, or the service's closing client waits 30 s for a server to end its sessions on)."""
    return await aiohttp_client(create_app(engine_settings.model_copy(update={"mongodb_url": own_store})))


@pytest.fixture
async def heavy_db(heavy_api: TestClient, own_store: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """That database, read directly."""
    mongo = make_client(own_store)
    yield mongo[database_name(own_store, "fltraining")]
    await mongo.close()


async def test_300_clients_run_their_rounds_and_a_refusing_one_is_removed(
    heavy_api: TestClient, heavy_db: AsyncDatabase[dict[str, Any]], receivers: Receivers
) -> None:
    """300 participants on the embedded store (or the MongoDB under test): one answers 410 to its round
    notification and is removed (the actor told); the other 299 train two rounds to C; every notification
    is one record, settled, with a receipt only for the refusal."""
    api, raw_db = heavy_api, heavy_db
    accounts = await insert_clients(raw_db, receivers, RECEIVERS)
    refusing = 7
    receivers.status[refusing] = 410
    receivers.on_round = trainer(api, accounts)
    actor = await register(api, actor=True, message_endpoint=receivers.url("actor"))
    training_id = await start(api, actor, accounts, target_num_updates=2, options={"skip_model_tests": True})

    final = await wait_for_state(api, actor, training_id, {"C", "E"}, SECONDS)
    assert final["state"] == "C", final
    assert not receivers.errors, receivers.errors[:5]
    assert accounts[refusing].id not in final["participants"] and len(final["participants"]) == RECEIVERS - 1
    stayed = [index for index in range(RECEIVERS) if index != refusing]

    async def all_finished() -> bool:
        return all("TRAINING_FINISHED" in receivers.got[index] for index in stayed)

    await wait_until(all_finished, "TRAINING_FINISHED at every remaining participant", SECONDS)
    for index in stayed:
        assert receivers.got[index] == ["TRAINING_START", "UPDATE_ROUND_START", "UPDATE_ROUND_START",
                                        "TRAINING_FINISHED"], (index, receivers.got[index])
    assert receivers.got[refusing] == ["TRAINING_START", "UPDATE_ROUND_START"]
    assert "CLIENT_REMOVED" in receivers.got[-1]

    events = await events_of(api, actor, training_id)
    aggregated = [event for event in events if event["type"] == "aggregated"]
    assert [event["round"] for event in aggregated] == [0, 1]
    for event in aggregated:  # each accepted update audited once, in its round's aggregation
        assert sorted(arrival["user"] for arrival in event["data"]["arrivals"]) == sorted(
            accounts[index].id for index in stayed)
    # Two FedAvg rounds of deltas index % 5 + 1 with equal weights.
    step = sum(index % 5 + 1 for index in stayed) / len(stayed)
    response = await api.get(f"/api/models/{final['model']}/", headers=actor.headers)
    for name, value in load_tensors(await response.read()).items():
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 2 * step), rtol=1e-5)

    async def settled() -> bool:
        return await raw_db["notifications"].count_documents({"training": UUID(training_id), "status": "pending"}) == 0

    await wait_until(settled, "every record settled", SECONDS)
    records = await raw_db["notifications"].find({"training": UUID(training_id)}).sort("_id", 1).to_list()
    kinds = [record["notification_type"] for record in records]
    assert kinds == ["TRAINING_START", "UPDATE_ROUND_START", "CLIENT_REMOVED", "UPDATE_ROUND_START",
                     "TRAINING_FINISHED"], kinds
    assert [len(record["receivers"]) for record in records] == [RECEIVERS, RECEIVERS, 1, RECEIVERS - 1, RECEIVERS]
    receipts = [(record["notification_type"], receipt["user"], receipt["status"])
                for record in records for receipt in record["receipts"]]
    assert receipts == [("UPDATE_ROUND_START", UUID(accounts[refusing].id), "rejected")], receipts
    assert [record["delivered"] for record in records] == [RECEIVERS, RECEIVERS - 1, 1, RECEIVERS - 1, RECEIVERS]


def engine_process(tmp_path: Path, store: str, **env: str) -> ServiceProcess:
    """A service process on the shared store: loopback endpoints, fast scans, a short delivery claim."""
    settings = {"FLTRAINING_MONGODB_URL": store, "FLTRAINING_NOTIFICATION_ALLOW_LOOPBACK": "true",
                "FLTRAINING_RECONCILE_INTERVAL_SECONDS": "0.2", "FLTRAINING_NOTIFICATION_BACKOFF_SECONDS": "0.05",
                # A claim lasts 2 × timeout + 5 s: the survivors take over 11 s after the kill.
                "FLTRAINING_NOTIFICATION_TIMEOUT_SECONDS": "3"}
    settings.update({f"FLTRAINING_{key.upper()}": value for key, value in env.items()})
    return ServiceProcess(tmp_path / "shared", env=settings)


async def test_a_fan_out_killed_midway_reaches_everyone_in_order_through_two_processes(
    tmp_path: Path, receivers: Receivers
) -> None:
    """A process SIGKILLed while its first fan-out is half delivered: two processes started after it take the
    records over (one claims each); every receiver gets TRAINING_START, then UPDATE_ROUND_START."""
    with EmbeddedStore(tmp_path / "store") as embedded:
        store = embedded.url.replace("/?", "/fanout?")
        doomed = engine_process(tmp_path, store)
        survivors = [engine_process(tmp_path, store), engine_process(tmp_path, store)]
        mongo = make_client(store)
        database = mongo[database_name(store, "fltraining")]
        apis: list[HttpApi] = []
        try:
            doomed.start()
            apis.append(HttpApi(doomed.base_url))
            accounts = await insert_clients(database, receivers, KILLED_RECEIVERS)
            actor = await register(cast(Any, apis[0]), actor=True)
            receivers.gate.clear()  # answers wait: the first deliveries stay in flight
            await start(apis[0], actor, accounts, target_num_updates=1)

            async def midway() -> bool:
                return sum(1 for index in range(KILLED_RECEIVERS) if receivers.got[index]) >= 32

            await wait_until(midway, "the first fan-out under way", SECONDS)
            assert doomed.process is not None
            doomed.process.kill()
            doomed.process.wait()
            reached = sum(1 for index in range(KILLED_RECEIVERS) if receivers.got[index])
            assert 32 <= reached < KILLED_RECEIVERS, reached
            pending = await database["notifications"].find({"status": "pending"}).to_list()
            assert {record["notification_type"] for record in pending} == {"TRAINING_START", "UPDATE_ROUND_START"}
            receivers.gate.set()
            for survivor in survivors:
                survivor.start()

            async def everyone() -> bool:
                return all("UPDATE_ROUND_START" in receivers.got[index] for index in range(KILLED_RECEIVERS))

            await wait_until(everyone, "every receiver reached after the kill", SECONDS)
            for index in range(KILLED_RECEIVERS):  # at least once, in order (a receiver may see a redelivery)
                assert receivers.first(index, "TRAINING_START") < receivers.first(index, "UPDATE_ROUND_START")
                assert receivers.last(index, "TRAINING_START") < receivers.last(index, "UPDATE_ROUND_START")

            async def settled() -> bool:
                return await database["notifications"].count_documents({"status": "pending"}) == 0

            await wait_until(settled, "both records settled", SECONDS)
            records = await database["notifications"].find({}).to_list()
            assert all(record["claimed_by"] is None and record["pending"] == [] for record in records)
        finally:
            for api in apis:
                await api.close()
            await mongo.close()
            doomed.stop()
            for survivor in survivors:
                survivor.stop()


async def test_retention_purge_removes_only_settled_records_past_it(
    settings: Any, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    """The sweeper's purge (beside the TTL index): past the retention a settled record goes, a pending one stays
    however old it is (it has no expiry), and a settled one within its retention stays."""
    mongo = make_client(settings.mongodb_url)
    await init_database(mongo[database_name(settings.mongodb_url, "fltraining")])
    now = utcnow()
    long_ago = now - timedelta(days=30)
    base = {"training": uuid4(), "notification_type": "TRAINING_START", "body": {}, "addressed": [],
            "round_notification": False, "receivers": [uuid4()], "receipts": [], "delivered": 0,
            "claimed_by": None, "created_at": long_ago, "next_attempt_at": long_ago}
    # Expiries in the future (a TTL monitor leaves them alone); the purge is asked as of three days on.
    records = {
        "settled-expiring": {"status": "settled", "pending": [], "settled_at": now, "expires_at": now + timedelta(days=1)},
        "settled-kept": {"status": "settled", "pending": [], "settled_at": now, "expires_at": now + timedelta(days=7)},
        "pending-old": {"status": "pending", "pending": base["receivers"], "settled_at": None, "expires_at": None},
    }
    await raw_db["notifications"].insert_many([{**base, "_id": key, **fields} for key, fields in records.items()])
    assert await purge_settled(now + timedelta(days=3)) == 1
    assert sorted([raw["_id"] async for raw in raw_db["notifications"].find({})]) == ["pending-old", "settled-kept"]
    assert await purge_settled(now + timedelta(days=3650)) == 1  # never the pending one
    assert [raw["_id"] async for raw in raw_db["notifications"].find({})] == ["pending-old"]
    await mongo.close()
