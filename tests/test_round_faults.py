"""Round engine under faults: two processes on one store, a killed lease holder, a restart with notifications pending.

Every test runs real `fltraining serve` processes on one embedded store (as test_two_processes.py)
and simulated clients that get their notifications over HTTP and talk to a chosen process.
"""

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import numpy as np
import pytest

from fltraining.storage.database import database_name, make_client
from fltraining.storage.embedded import EmbeddedStore
from tests.fl_clients import (
    GLOBAL_TENSORS,
    HttpApi,
    SimulatedClient,
    audit_trail,
    bring_notifications_up,
    model_bytes,
    start_clients,
    stop_clients,
    take_notifications_down,
    wait_for_notification,
    wait_for_state,
    wait_until,
)
from tests.helpers import Account, create_training, register, upload_model
from tests.processes import ServiceProcess
from tests.test_server_optimizers import steady_path

TARGET = 3
SECONDS = 45.0
ENGINE_ENV = {
    "FLTRAINING_NOTIFICATION_ALLOW_LOOPBACK": "true",
    "FLTRAINING_RECONCILE_INTERVAL_SECONDS": "0.2",
    "FLTRAINING_NOTIFICATION_BACKOFF_SECONDS": "0.05",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A fresh embedded store; its URL names the database the processes share."""
    with EmbeddedStore(tmp_path / "store") as embedded:
        yield embedded.url.replace("/?", "/faults?")


@pytest.fixture
async def mongo(store: str) -> AsyncIterator[Any]:
    """The shared database, read directly with PyMongo."""
    client = make_client(store)
    yield client[database_name(store, "fltraining")]
    await client.close()


def service(tmp_path: Path, store: str, **env: str) -> ServiceProcess:
    """A service process on the shared store and the shared data directory, as processes of one
    machine share it (the `files` blob store needs that); loopback endpoints, fast reconciling and retries."""
    settings = {"FLTRAINING_MONGODB_URL": store, **ENGINE_ENV}
    settings.update({f"FLTRAINING_{key.upper()}": value for key, value in env.items()})
    return ServiceProcess(tmp_path / "shared", env=settings)


def talk_to(clients: list[SimulatedClient], api: HttpApi) -> None:
    """From now on these clients download and upload through `api`."""
    for client in clients:
        client.api = cast(Any, api)


async def start_training(api: HttpApi, actor: Account, clients: list[SimulatedClient], **body: Any) -> str:
    """A FedAvg training of the clients on the simulated clients' model, started; returns its id."""
    http = cast(Any, api)
    model_id = await upload_model(http, actor, model_bytes())
    training_id = await create_training(http, actor, model_id, clients=[c.account.id for c in clients],
                                        target_num_updates=TARGET, **body)
    response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 202, await response.text()
    return training_id


events_of = audit_trail  # the training's whole audit trail (an ended training's once its last events are written)


def expected_weight(clients: list[SimulatedClient]) -> float:
    """Every round each client adds index + 1 with sample size index + 1: TARGET weighted-mean steps."""
    step = sum(c.sample_size * (c.index + 1) for c in clients) / sum(c.sample_size for c in clients)
    return TARGET * step


async def assert_completed_correctly(api: HttpApi, actor: Account, training_id: str,
                                     clients: list[SimulatedClient]) -> list[dict[str, Any]]:
    """C at round TARGET, each round aggregated once, the weighted-mean weights; returns the events."""
    final = await wait_for_state(cast(Any, api), actor, training_id, {"C", "E"}, SECONDS)
    assert final["state"] == "C", final
    assert final["round"] == TARGET
    events = await events_of(api, actor, training_id)
    aggregated = Counter(event["round"] for event in events if event["type"] == "aggregated")
    assert aggregated == Counter(range(TARGET)), f"aggregations per round: {dict(aggregated)}"
    model = await clients[0].download(final["model"])
    assert set(model) == set(GLOBAL_TENSORS)
    for name, value in model.items():
        assert value.dtype == GLOBAL_TENSORS[name].dtype
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, expected_weight(clients)), rtol=1e-6)
    await wait_for_notification(clients, "TRAINING_FINISHED")
    for client in clients:
        assert not client.errors, client.errors
    return events


async def test_two_processes_aggregate_every_round_once(tmp_path: Path, store: str) -> None:
    first = service(tmp_path, store)
    second = service(tmp_path, store)
    clients: list[SimulatedClient] = []
    with first, second:
        api_a, api_b = HttpApi(first.base_url), HttpApi(second.base_url)
        try:
            actor = await register(cast(Any, api_a), actor=True)
            clients = await start_clients(cast(Any, api_a), 4)
            for client in clients:
                client.sample_size = client.index + 1
            talk_to(clients[0::2], api_a)
            talk_to(clients[1::2], api_b)
            training_id = await start_training(api_a, actor, clients)
            await assert_completed_correctly(api_a, actor, training_id, clients)
            for client in clients:
                assert client.types().count("UPDATE_ROUND_START") == TARGET, client.types()
                assert [round_ for round_, _ in client.uploads] == list(range(TARGET))
        finally:
            await stop_clients(clients)
            await api_a.close()
            await api_b.close()


async def test_sigkilled_lease_holder_is_replaced(tmp_path: Path, store: str, mongo: Any) -> None:
    holder = service(tmp_path, store, fault_hold_after_claim="true", lock_lease_seconds="2")
    rescuer = service(tmp_path, store)
    clients: list[SimulatedClient] = []
    api_a = api_b = None
    try:
        holder.start()
        assert holder.process is not None
        holder_pid = holder.process.pid
        api_a = HttpApi(holder.base_url)
        actor = await register(cast(Any, api_a), actor=True)
        clients = await start_clients(cast(Any, api_a), 3)
        for client in clients:
            client.sample_size = client.index + 1
        training_id = await start_training(api_a, actor, clients)

        async def held_by_holder() -> bool:
            stored = await mongo.trainings.find_one({"_id": UUID(training_id)})
            return (stored is not None and stored.get("phase") == "aggregating"
                    and f":{holder_pid}:" in (stored.get("lease_owner") or ""))

        await wait_until(held_by_holder, "the holder claimed round 0", SECONDS)
        rescuer.start()
        holder.process.kill()
        holder.process.wait()
        api_b = HttpApi(rescuer.base_url)
        talk_to(clients, api_b)

        events = await assert_completed_correctly(api_b, actor, training_id, clients)
        expired = [event for event in events if event["type"] == "lease_expired"]
        assert [event["round"] for event in expired] == [0], expired
        assert f":{holder_pid}:" in expired[0]["data"]["previous_owner"]
        for client in clients:
            assert client.types().count("UPDATE_ROUND_START") >= TARGET, client.types()
            assert sorted({round_ for round_, _ in client.uploads}) == list(range(TARGET))
    finally:
        await stop_clients(clients)
        for api in (api_a, api_b):
            if api is not None:
                await api.close()
        holder.stop()
        rescuer.stop()


async def test_a_server_optimizers_state_survives_a_holder_killed_before_its_commit(
    tmp_path: Path, store: str, mongo: Any,
) -> None:
    # The holder commits round 0 (m, v and step 1 beside the global model), computes round 1 (new global, m
    # and v files written) and hangs before committing it; killed, its lease expires and another process
    # redoes round 1 from the state round 0 committed.
    holder = service(tmp_path, store, fault_hold_before_commit="1", lock_lease_seconds="2")
    rescuer = service(tmp_path, store)
    clients: list[SimulatedClient] = []
    api_a = api_b = None
    try:
        holder.start()
        assert holder.process is not None
        api_a = HttpApi(holder.base_url)
        actor = await register(cast(Any, api_a), actor=True)
        clients = await start_clients(cast(Any, api_a), 3)
        for client in clients:
            client.sample_size = client.index + 1
        training_id = await start_training(api_a, actor, clients,
                                           options={"server_optimizer": {"name": "adam"}, "skip_model_tests": True})
        model_id = (await (await api_a.get(f"/api/trainings/{training_id}/", headers=actor.headers)).json())["model"]

        async def holding() -> bool:
            return "holding round 1 before its commit" in holder.log()

        await wait_until(holding, "the holder computed round 1", SECONDS)
        stored = await mongo.models.find_one({"_id": UUID(model_id)})
        assert stored["optimizer_steps"] == 1  # round 0's step is committed, round 1's is not
        rescuer.start()
        holder.process.kill()
        holder.process.wait()
        api_b = HttpApi(rescuer.base_url)
        talk_to(clients, api_b)

        final = await wait_for_state(cast(Any, api_b), actor, training_id, {"C", "E"}, SECONDS)
        assert final["state"] == "C", final
        events = await events_of(api_b, actor, training_id)
        aggregated = [event["data"] for event in events if event["type"] == "aggregated"]
        assert [(data["optimizer"], data["optimizer_step"]) for data in aggregated] == [("adam", t) for t in (1, 2, 3)]
        assert [event["round"] for event in events if event["type"] == "lease_expired"] == [1]
        model = await clients[0].download(final["model"])
        step = sum(c.sample_size * (c.index + 1) for c in clients) / sum(c.sample_size for c in clients)
        for name, value in model.items():  # a step redone from a lost or doubled state would land elsewhere
            np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, steady_path("adam", step, TARGET)),
                                       rtol=1e-5)
        stored = await mongo.models.find_one({"_id": UUID(model_id)})
        assert stored["optimizer_steps"] == TARGET
    finally:
        await stop_clients(clients)
        for api in (api_a, api_b):
            if api is not None:
                await api.close()
        holder.stop()
        rescuer.stop()


async def test_restart_delivers_pending_notifications(tmp_path: Path, store: str, mongo: Any) -> None:
    env = {"notification_max_attempts": "50", "notification_backoff_seconds": "0.2",
           "notification_timeout_seconds": "2"}
    before = service(tmp_path, store, **env)
    after = service(tmp_path, store, **env)
    clients: list[SimulatedClient] = []
    api_before = api_after = None
    try:
        before.start()
        api_before = HttpApi(before.base_url)
        actor = await register(cast(Any, api_before), actor=True)
        clients = await start_clients(cast(Any, api_before), 3)
        for client in clients:
            client.sample_size = client.index + 1
        ports = [await take_notifications_down(client) for client in clients]
        users = [UUID(client.account.id) for client in clients]
        training_id = await start_training(api_before, actor, clients)

        async def all_tried_and_pending() -> bool:
            # Each receiver's notifications are in order: TRAINING_START is retried for every receiver while
            # the UPDATE_ROUND_START behind it waits (deferred, no attempt counted).
            records = await mongo.notifications.find({"training": UUID(training_id)}).sort("_id", 1).to_list()
            return ([record["notification_type"] for record in records] == ["TRAINING_START", "UPDATE_ROUND_START"]
                    and all(record["status"] == "pending" and set(record["pending"]) == set(users)
                            for record in records)
                    and {(r["user"], r["status"]) for r in records[0]["receipts"] if r["attempts"] >= 1}
                    == {(user, "retrying") for user in users})

        await wait_until(all_tried_and_pending, "every receiver tried and its notifications still pending", SECONDS)
        before.stop()
        pending = await mongo.notifications.find({"training": UUID(training_id)}).to_list()
        assert {record["status"] for record in pending} == {"pending"}, pending
        assert all(receipt["attempts"] < 50 for record in pending for receipt in record["receipts"])
        assert not any(client.received for client in clients)

        for client, port in zip(clients, ports):
            await bring_notifications_up(client, port)
        after.start()
        api_after = HttpApi(after.base_url)
        talk_to(clients, api_after)

        async def delivered() -> bool:
            ids = [record["_id"] for record in pending]
            records = await mongo.notifications.find({"_id": {"$in": ids}}).to_list()
            return all(record["status"] == "settled" for record in records)

        await wait_until(delivered, "the pending notifications delivered after the restart", SECONDS)
        for client in clients:
            assert client.types().count("TRAINING_START") >= 1, client.types()
            assert client.types().count("UPDATE_ROUND_START") >= 1, client.types()
            assert client.types().index("TRAINING_START") < client.types().index("UPDATE_ROUND_START")
        await assert_completed_correctly(api_after, actor, training_id, clients)

        async def settled() -> bool:
            return await mongo.notifications.count_documents({"training": UUID(training_id), "status": "pending"}) == 0

        await wait_until(settled, "every client notification settled", SECONDS)
        records = await mongo.notifications.find({"training": UUID(training_id)}).to_list()
        # Delivered to every client: no client's receipt says otherwise (a receiver retried ends "delivered");
        # the actor, who has no message endpoint, is the only one dropped.
        statuses = {(receipt["user"] in users, receipt["status"]) for record in records for receipt in record["receipts"]}
        assert statuses <= {(True, "delivered"), (False, "dropped")}, records
    finally:
        await stop_clients(clients)
        for api in (api_before, api_after):
            if api is not None:
                await api.close()
        before.stop()
        after.stop()
