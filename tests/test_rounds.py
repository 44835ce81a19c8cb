"""End to end over real HTTP: simulated clients run trainings to completion through notifications."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from fltraining.engine.rounds import LeaseKeeper
from fltraining.settings import Settings
from fltraining.storage.database import database_name, make_client
from fltraining.weights import detect_format, dump_tensors, load_tensors
from routes.app import create_app
from routes.keys import engine_key
from tests.fl_clients import (
    GLOBAL_TENSORS,
    SimulatedClient,
    assert_stays,
    audit_trail,
    model_bytes,
    wait_for_notification,
    wait_for_state,
    wait_until,
)
from tests.helpers import (
    Account,
    create_training,
    next_frame,
    register,
    stored_training,
    update_stored_training,
    upload_model,
)


async def run_training(api: TestClient, actor: Account, clients: list[SimulatedClient],
                       content: bytes | None = None, **body: Any) -> str:
    """Create and start a training of the simulated clients (on `content`, by default their safetensors
    model); returns its id."""
    model_id = await upload_model(api, actor, content or model_bytes())
    training_id = await create_training(api, actor, model_id, clients=[c.account.id for c in clients], **body)
    response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 202, await response.text()
    return training_id


events_of = audit_trail  # the training's whole audit trail (an ended training's once its last events are written)


async def test_fedavg_runs_to_completion(api: TestClient, clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=3)
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    assert final["round"] == 3
    # Each round every client adds (index + 1) with sample sizes 1, 2, 3: the mean step is 14/6.
    model = await clients[0].download(final["model"])
    for name, value in model.items():
        assert value.dtype == GLOBAL_TENSORS[name].dtype
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 3 * 14 / 6), rtol=1e-6)
    await wait_for_notification(clients, "TRAINING_FINISHED")
    for client in clients:
        assert not client.errors
        assert client.types() == ["TRAINING_START", *["UPDATE_ROUND_START", "MODEL_TEST_ROUND"] * 3,
                                  "TRAINING_FINISHED"]
    types = [event["type"] for event in await events_of(api, actor, training_id)]
    assert types.count("aggregated") == 3
    assert types.count("testing_completed") == 3


async def test_a_pytorch_model_is_trained_and_handed_back_as_a_pytorch_state_dict(
    api: TestClient, clients: list[SimulatedClient]
) -> None:
    """What DLR's Python client does: the global model is a torch.save(state_dict) file, and it reads the
    aggregated model back with torch.load(weights_only=True) (checked against real torch in
    tests/test_torch_files.py's torch tier and by hand)."""
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, dump_tensors(GLOBAL_TENSORS, "torch"), target_num_updates=1)
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    response = await api.get(f"/api/models/{final['model']}/", headers=actor.headers)
    content = await response.read()
    assert detect_format(content) == "torch"
    for name, value in load_tensors(content).items():
        assert value.dtype == GLOBAL_TENSORS[name].dtype
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 14 / 6), rtol=1e-6)


async def test_exhausted_notification_retries_end_the_training(
    api: TestClient, clients: list[SimulatedClient], database_url: str
) -> None:
    clients[1].answer_status = 503  # a receiver that is down for good
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2)
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "E"
    assert final["state_detail"]["reason"] == "notification_failed"
    assert final["state_detail"]["user"] == clients[1].account.id
    # Every attempt reached the receiver (default 5), and the failure is in the audit trail.
    assert clients[1].types().count("TRAINING_START") + clients[1].types().count("UPDATE_ROUND_START") >= 5
    failed = [event for event in await events_of(api, actor, training_id) if event["type"] == "notification_failed"]
    assert failed and {event["user"] for event in failed} == {clients[1].account.id}
    # The record of TRAINING_START says so for that receiver alone; the others had it at once.
    mongo = make_client(database_url)
    try:
        notifications = mongo[database_name(database_url, "fltraining")]["notifications"]
        record = await notifications.find_one({"training": UUID(training_id), "notification_type": "TRAINING_START"})
    finally:
        await mongo.close()
    assert record is not None and record["status"] == "settled" and record["delivered"] == 2
    assert [(r["user"], r["status"], r["attempts"]) for r in record["receipts"]] == [
        (UUID(clients[1].account.id), "failed", 5)]
    assert all(client.types()[:1] == ["TRAINING_START"] for client in (clients[0], clients[2]))


async def test_a_client_answering_500_ends_the_training_with_its_event_and_the_stream_ends(
    api: TestClient, clients: list[SimulatedClient], database_url: str
) -> None:
    """DLR's client answers SWAG_ROUND_START with 500. Before: E was reached but its state_changed event
    failed the events validator (a string user), its effect stayed pending forever and the SSE stream
    never ended."""
    clients[2].answer_status = 500
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=2)
    headers = {**actor.headers, "Accept": "text/event-stream"}
    async with asyncio.timeout(60):
        response = await api.get(f"/api/trainings/{training_id}/events/", headers=headers)
        assert response.status == 200
        frames = []
        while (frame := await next_frame(response)) is not None:  # ends by itself once the training is E
            frames.append(json.loads(frame["data"]))
    final = await wait_for_state(api, actor, training_id, {"E"})
    assert final["state_detail"]["reason"] == "notification_failed"
    ended = [frame for frame in frames if frame["type"] == "state_changed" and frame["data"].get("state") == "E"]
    assert len(ended) == 1
    assert ended[0]["user"] == clients[2].account.id and ended[0]["data"]["reason"] == "notification_failed"
    assert [event["type"] for event in await events_of(api, actor, training_id)].count("state_changed") >= 2
    training = await stored_training(database_url, training_id)
    assert training is not None and training["effects"] == []
    mongo = make_client(database_url)
    try:
        assert await mongo[database_name(database_url, "x")]["set_aside_effects"].count_documents({}) == 0
    finally:
        await mongo.close()


async def test_an_effect_the_store_refuses_is_set_aside_once_and_blocks_nothing(
    api: TestClient, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    actor = await register(api, actor=True)
    training_id = await create_training(api, actor, await upload_model(api, actor, model_bytes()))
    at = datetime.now(UTC).replace(microsecond=0)
    broken = {"id": "0000000000001-00-broken", "kind": "event", "at": at, "type": "probe", "round": 0,
              "user": "not a uuid", "data": {}}  # the events validator refuses a string user
    fine = {**broken, "id": "0000000000001-01-fine", "user": None}
    await update_stored_training(database_url, training_id, effects=[broken, fine])
    engine = api.server.app[engine_key]
    for _ in range(2):  # applied twice (two processes, a retry): logged and kept once
        await engine.advance(UUID(training_id))
    assert (await stored_training(database_url, training_id) or {}).get("effects") == []
    assert [event["id"] for event in await events_of(api, actor, training_id)] == [fine["id"]]
    mongo = make_client(database_url)
    try:
        [kept] = await mongo[database_name(database_url, "x")]["set_aside_effects"].find({}).to_list()
    finally:
        await mongo.close()
    assert (kept["_id"], str(kept["training"]), kept["effect"]["user"]) == (broken["id"], training_id, "not a uuid")
    assert "WriteError" in kept["error"]
    logged = [record for record in caplog.records if "set aside" in record.getMessage()]
    assert len(logged) == 1 and logged[0].levelname == "ERROR" and training_id in logged[0].getMessage()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://[::1]/x",
                                      "ftp://example.org/x"])
async def test_forbidden_message_endpoints_are_refused_at_registration(aiohttp_client: Any, settings: Settings,
                                                                       endpoint: str) -> None:
    service = await aiohttp_client(create_app(settings))  # loopback not allowed (the default)
    response = await service.post("/api/users/", json={"username": "hooked", "password": "a long password",
                                                       "message_endpoint": endpoint})
    assert response.status == 400, await response.text()
    assert (await service.get("/api/users/", headers={"Authorization": "Basic aG9va2VkOmEgbG9uZyBwYXNzd29yZA=="})).status == 401


async def test_a_model_stored_before_formats_were_recorded_is_described_at_start(
    api: TestClient, clients: list[SimulatedClient], database_url: str
) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    mongo = make_client(database_url)
    try:
        models = mongo[database_name(database_url, "fltraining")]["models"]
        await models.update_one({"_id": UUID(model_id)}, {"$set": {"format": None, "format_problem": None, "tensors": []}})
        training_id = await create_training(api, actor, model_id, clients=[clients[0].account.id], target_num_updates=1)
        response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
        assert response.status == 202, await response.text()
        stored = await models.find_one({"_id": UUID(model_id)})
        assert stored is not None and stored["format"] == "safetensors"
        assert {tensor["name"] for tensor in stored["tensors"]} == set(GLOBAL_TENSORS)
    finally:
        await mongo.close()
    assert (await wait_for_state(api, actor, training_id, {"C", "E"}))["state"] == "C"


async def test_a_receiver_gets_its_notifications_in_order_across_retries(
    api: TestClient, clients: list[SimulatedClient], database_url: str
) -> None:
    flaky = clients[0]
    flaky.answer_status = 503
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=1)
    mongo = make_client(database_url)
    try:
        notifications = mongo[database_name(database_url, "fltraining")]["notifications"]

        async def retried_twice() -> bool:
            record = await notifications.find_one({"training": UUID(training_id), "notification_type": "TRAINING_START"})
            receipts = [] if record is None else [r for r in record["receipts"] if r["user"] == UUID(flaky.account.id)]
            return bool(receipts) and receipts[0]["attempts"] >= 2 and receipts[0]["status"] == "retrying"

        await wait_until(retried_twice, "TRAINING_START retried")
        # While its first notification waits for a retry, the next one is not sent ahead of it.
        assert set(flaky.types()) == {"TRAINING_START"}
        flaky.answer_status = None
    finally:
        await mongo.close()
    assert (await wait_for_state(api, actor, training_id, {"C", "E"}))["state"] == "C"
    types = flaky.types()
    last_start = len(types) - 1 - types[::-1].index("TRAINING_START")
    assert types[last_start + 1:][:1] == ["UPDATE_ROUND_START"]
    assert "UPDATE_ROUND_START" not in types[:last_start]


async def test_the_lease_is_renewed_only_while_the_aggregation_makes_progress(
    api: TestClient, database_url: str
) -> None:
    actor = await register(api, actor=True)
    training_id = await create_training(api, actor, await upload_model(api, actor, model_bytes()))
    claimed_until = datetime.now(UTC) + timedelta(seconds=0.3)
    # State C keeps the service's own reconciler away from this hand-made claim (it only looks at O and S).
    await update_stored_training(database_url, training_id, state="C", phase="aggregating",
                                 lease_owner="host:1:token", lease_until=claimed_until)
    keeper = LeaseKeeper(UUID(training_id), "host:1:token", timedelta(seconds=0.3))
    keeping = asyncio.create_task(keeper.run())
    try:
        keeper.advanced()

        async def renewed() -> bool:
            stored = await stored_training(database_url, training_id)
            return stored is not None and stored["lease_until"] > claimed_until

        await wait_until(renewed, "lease renewed after progress", seconds=5)
        stored = await stored_training(database_url, training_id)
        assert stored is not None
        last = stored["lease_until"]
        # No progress: the lease is left to run out, so another process can take over stuck work.
        await assert_stays(lambda: _lease_is(database_url, training_id, last), "lease not renewed", 0.5)
    finally:
        keeping.cancel()


async def _lease_is(database_url: str, training_id: str, until: datetime) -> bool:
    stored = await stored_training(database_url, training_id)
    return stored is not None and stored["lease_until"] == until


async def test_pending_effects_are_found_through_their_marker_and_the_marker_is_cleared(
    api: TestClient, raw_db: Any
) -> None:
    """A step's effects set an indexed marker; an effect a dead process left (written here directly) is
    found by the reconciler through it and applied, and the marker is cleared once nothing is pending."""
    actor = await register(api, actor=True)
    training_id = await create_training(api, actor)
    stored_id = UUID(training_id)
    effect = {"id": "0000000000001-00-deadbeef", "kind": "event", "at": datetime.now(UTC), "type": "left_by_a_crash",
              "round": 0, "user": None, "data": {}}
    await raw_db["trainings"].update_one({"_id": stored_id},
                                         {"$push": {"effects": effect}, "$set": {"effects_pending": True}})

    async def applied_and_cleared() -> bool:
        stored = await raw_db["trainings"].find_one({"_id": stored_id})
        event = await raw_db["events"].find_one({"_id": effect["id"]})
        return event is not None and stored["effects"] == [] and stored["effects_pending"] is False

    await wait_until(applied_and_cleared, "the left effect applied and the marker cleared")
