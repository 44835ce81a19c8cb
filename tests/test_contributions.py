"""Contract tests of the round engine's contribution endpoints, driven by hand.

The simulated clients are silent (they accept notifications but never upload), so every upload,
metric and download below is a request built here, and each test checks what a client would
notice: the status, the JSON body, and that a refused request stored nothing.
"""

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from uuid import UUID, uuid4

import numpy as np
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from fltraining.storage.database import database_name, make_client
from fltraining.weights import dump_tensors, load_tensors
from routes import rounds as rounds_routes
from tests.fl_clients import (
    GLOBAL_TENSORS,
    SimulatedClient,
    model_bytes,
    start_clients,
    stop_clients,
    wait_for_notification,
    wait_for_state,
    wait_until,
)
from tests.helpers import PASSWORD, Account, create_training, get_training, next_frame, register, upload_model
from tests.test_rounds import events_of, run_training

SSE_SECONDS = 20.0
EVENT_FIELDS = {"id", "training", "type", "round", "at", "user", "data"}
METRIC_FIELDS = {"id", "model", "identifier", "key", "value_float", "value_binary", "step", "reporter", "created_at"}


def trained(delta: float) -> bytes:
    """A valid update: the global model's tensors plus `delta`."""
    return model_bytes({name: value + np.float32(delta) for name, value in GLOBAL_TENSORS.items()})


def update_form(round_: str | None = "0", sample_size: str | None = "1", content: bytes | None = None,
                extra: tuple[tuple[str, str], ...] = ()) -> FormData:
    """A multipart update form; a field given as None is left out (the body stays multipart)."""
    form = FormData(default_to_multipart=True)
    if round_ is not None:
        form.add_field("round", round_)
    if sample_size is not None:
        form.add_field("sample_size", sample_size)
    for name, value in extra:
        form.add_field(name, value)
    if content is not None:
        form.add_field("model_file", content, filename="model_file", content_type="application/octet-stream")
    return form


async def post_update(api: TestClient, account: Account, model_id: str, form: FormData) -> tuple[int, Any]:
    """POST an update form; returns the status and the JSON body."""
    response = await api.post(f"/api/models/{model_id}/", data=form, headers=account.headers)
    return response.status, await response.json()


async def training_models(api: TestClient, account: Account, training_id: str, latest: bool = False) -> list[Any]:
    """GET /api/trainings/{id}/models/ (or /latest/), asserting 200."""
    path = f"/api/trainings/{training_id}/models/" + ("latest/" if latest else "")
    response = await api.get(path, headers=account.headers)
    assert response.status == 200, await response.text()
    return list(await response.json())


async def snapshot(api: TestClient, actor: Account, training_id: str) -> tuple[int, list[Any]]:
    """What a refused upload must leave unchanged: the arrivals count and the training's models."""
    training = await get_training(api, actor, training_id)
    return training["local_models_arrived"], await training_models(api, actor, training_id)


async def metrics_of(api: TestClient, account: Account, model_id: str) -> list[Any]:
    """GET /api/models/{id}/metrics/, asserting 200."""
    response = await api.get(f"/api/models/{model_id}/metrics/", headers=account.headers)
    assert response.status == 200, await response.text()
    return list(await response.json())


def basic(account: Account) -> dict[str, str]:
    """HTTP Basic authentication with the user's name and password, as the DLR client sends it."""
    encoded = base64.b64encode(f"{account.username}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


DLR_BOUNDARY = "8f3c1e0a5b7d49e2a6c4f1b0d9e87a65"


def dlr_multipart(texts: list[tuple[str, str]], content: bytes) -> tuple[bytes, str]:
    """A multipart body shaped like the DLR client's: text fields first, then `model_file` without Content-Type."""
    parts = [f'--{DLR_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in texts]
    parts.append(f'--{DLR_BOUNDARY}\r\nContent-Disposition: form-data; name="model_file"; '
                 f'filename="model_file"\r\n\r\n'.encode() + content + b"\r\n")
    parts.append(f"--{DLR_BOUNDARY}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={DLR_BOUNDARY}"


@dataclass
class Round:
    """A started training whose participants only do what the test sends for them."""

    actor: Account
    clients: list[SimulatedClient]
    stranger: Account
    training_id: str
    model_id: str

    @property
    def first(self) -> Account:
        return self.clients[0].account

    @property
    def second(self) -> Account:
        return self.clients[1].account


@pytest.fixture
async def silent(api: TestClient) -> AsyncIterator[list[SimulatedClient]]:
    """Two participants that accept notifications and never upload."""
    clients = await start_clients(api, 2, silent=True)
    yield clients
    await stop_clients(clients)


@pytest.fixture
async def started(api: TestClient, silent: list[SimulatedClient]) -> Round:
    """A FedAvg training of the two silent participants, started and waiting for round 0 updates."""
    actor = await register(api, actor=True)
    stranger = await register(api)
    training_id = await run_training(api, actor, silent, target_num_updates=1)
    training = await get_training(api, actor, training_id)
    assert (training["state"], training["round"], training["phase"]) == ("O", 0, "updates"), training

    async def round_announced() -> bool:  # the start's events are applied just after its 202
        return "round_started" in [event["type"] for event in await events_of(api, actor, training_id)]

    await wait_until(round_announced, "round_started event")
    return Round(actor, silent, stranger, training_id, training["model"])


async def wait_for_phase(api: TestClient, account: Account, training_id: str, round_: int, phase: str) -> None:
    """Poll until the training is in `round_` and `phase`."""

    async def reached() -> bool:
        training = await get_training(api, account, training_id)
        return (training["round"], training["phase"]) == (round_, phase)

    await wait_until(reached, f"round {round_} phase {phase}")


# 1. POST /api/models/{id}/: local updates


async def test_update_accepted_and_counted(api: TestClient, started: Round) -> None:
    status, body = await post_update(api, started.first, started.model_id, update_form(sample_size="5",
                                                                                        content=trained(1)))
    assert (status, body) == (201, {"detail": "Model Update Accepted"})
    arrived, models = await snapshot(api, started.actor, started.training_id)
    assert arrived == 1
    local = [entry for entry in models if entry["type"] == "LOCAL"]
    assert len(local) == 1
    assert (local[0]["owner"], local[0]["round"], local[0]["sample_size"]) == (started.first.id, 0, 5)
    assert local[0]["sha256"] == hashlib.sha256(trained(1)).hexdigest()


async def test_progress_names_who_arrived_when_and_who_is_expected(api: TestClient, started: Round) -> None:
    path = f"/api/trainings/{started.training_id}/progress/"
    first, second = (client.account for client in started.clients)
    before = await (await api.get(path, headers=started.actor.headers)).json()
    assert (before["round"], before["phase"], before["state"]) == (0, "updates", "O")
    assert sorted(before["participants"]) == sorted([first.id, second.id]) == sorted(before["expected"])
    assert (before["arrived_count"], before["expected_count"], before["arrived"]) == (0, 2, [])
    status, _ = await post_update(api, first, started.model_id, update_form(sample_size="5", content=trained(1)))
    assert status == 201
    # A participant sees it too; a stranger does not.
    after = await (await api.get(path, headers=second.headers)).json()
    assert (after["arrived_count"], after["expected"]) == (1, [second.id])
    arrival = after["arrived"][0]
    assert (arrival["user"], arrival["sample_size"], arrival["size"]) == (first.id, 5, len(trained(1)))
    assert arrival["sha256"] == hashlib.sha256(trained(1)).hexdigest() and arrival["at"].endswith("Z")
    assert (await api.get(path, headers=started.stranger.headers)).status == 403
    assert (await api.get(f"/api/trainings/{uuid4()}/progress/", headers=started.actor.headers)).status == 404


@pytest.mark.parametrize("missing", ["round", "sample_size", "model_file"])
async def test_update_missing_field_refused(api: TestClient, started: Round, missing: str) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    form = update_form(round_=None if missing == "round" else "0",
                       sample_size=None if missing == "sample_size" else "1",
                       content=None if missing == "model_file" else trained(1))
    status, body = await post_update(api, started.first, started.model_id, form)
    assert status == 400, body
    assert missing in body["detail"]
    assert await snapshot(api, started.actor, started.training_id) == before


async def test_update_invalid_sample_size_refused(api: TestClient, started: Round) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    for sample_size in ("0", "-1", "ten", "1.5", ""):
        status, body = await post_update(api, started.first, started.model_id,
                                         update_form(sample_size=sample_size, content=trained(1)))
        assert status == 400, (sample_size, body)
        assert isinstance(body["detail"], str) and body["detail"]
        assert await snapshot(api, started.actor, started.training_id) == before, sample_size


async def test_update_unknown_field_refused(api: TestClient, started: Round) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    form = update_form(content=trained(1), extra=(("colour", "blue"),))
    status, body = await post_update(api, started.first, started.model_id, form)
    assert status == 400, body
    assert "colour" in body["detail"]
    assert await snapshot(api, started.actor, started.training_id) == before


async def test_update_owner_field_is_ignored(api: TestClient, started: Round) -> None:
    # The DLR client names itself in `owner`; the credentials decide, even when `owner` names someone else.
    form = update_form(content=trained(1), extra=(("owner", started.second.id),))
    status, body = await post_update(api, started.first, started.model_id, form)
    assert (status, body) == (201, {"detail": "Model Update Accepted"})
    arrived, models = await snapshot(api, started.actor, started.training_id)
    assert arrived == 1
    assert [entry["owner"] for entry in models if entry["type"] == "LOCAL"] == [started.first.id]
    # The participant named in `owner` still has its own upload to make.
    status, body = await post_update(api, started.second, started.model_id, update_form(content=trained(2)))
    assert status == 201, body


async def test_identical_retry_accepted_once(api: TestClient, started: Round) -> None:
    for _ in range(2):
        status, body = await post_update(api, started.first, started.model_id,
                                         update_form(sample_size="3", content=trained(1)))
        assert (status, body) == (201, {"detail": "Model Update Accepted"})
    arrived, models = await snapshot(api, started.actor, started.training_id)
    assert arrived == 1
    assert len([entry for entry in models if entry["type"] == "LOCAL"]) == 1


async def test_concurrent_duplicate_uploads_arrive_once(api: TestClient, started: Round) -> None:
    """Eight identical uploads at once, and one different one: the record of arrival is the stored update, so
    the first participant arrives once, the round aggregates once, and its audit lists each participant once."""
    forms = [update_form(sample_size="3", content=trained(1)) for _ in range(8)]
    answers = await asyncio.gather(*(post_update(api, started.first, started.model_id, form) for form in forms),
                                   post_update(api, started.first, started.model_id,
                                               update_form(sample_size="3", content=trained(5))))
    statuses = [status for status, _ in answers]
    # The different upload is refused, unless it was the first stored: then the eight identical ones are.
    assert sorted(statuses) in ([201] * 8 + [409], [201] + [409] * 8), answers
    arrived, models = await snapshot(api, started.actor, started.training_id)
    assert arrived == 1
    assert len([entry for entry in models if entry["type"] == "LOCAL"]) == 1
    status, _ = await post_update(api, started.second, started.model_id, update_form(content=trained(2)))
    assert status == 201
    await wait_for_phase(api, started.actor, started.training_id, 1, "testing")

    async def aggregations() -> list[dict[str, Any]]:  # the step's events are written just after it
        return [event for event in await events_of(api, started.actor, started.training_id)
                if event["type"] == "aggregated"]

    async def audited() -> bool:
        return bool(await aggregations())

    await wait_until(audited, "the aggregation's event")
    [aggregated] = await aggregations()
    arrivals = aggregated["data"]["arrivals"]
    assert sorted(arrival["user"] for arrival in arrivals) == sorted([started.first.id, started.second.id])
    by_user = {arrival["user"]: arrival for arrival in arrivals}
    kept = trained(1) if statuses.count(201) == 8 else trained(5)
    assert by_user[started.first.id]["sha256"] == hashlib.sha256(kept).hexdigest()
    assert (by_user[started.first.id]["sample_size"], by_user[started.first.id]["size"]) == (3, len(kept))


@pytest.mark.parametrize("second", ["other bytes", "other sample size"])
async def test_different_second_update_conflicts(api: TestClient, started: Round, second: str) -> None:
    status, _ = await post_update(api, started.first, started.model_id,
                                  update_form(sample_size="3", content=trained(1)))
    assert status == 201
    before = await snapshot(api, started.actor, started.training_id)
    form = (update_form(sample_size="3", content=trained(7)) if second == "other bytes"
            else update_form(sample_size="4", content=trained(1)))
    status, body = await post_update(api, started.first, started.model_id, form)
    assert status == 409, body
    assert isinstance(body["detail"], str)
    assert await snapshot(api, started.actor, started.training_id) == before
    # The first update is the one kept, byte for byte.
    [local] = [entry for entry in before[1] if entry["type"] == "LOCAL"]
    assert local["sample_size"] == 3
    response = await api.get(f"/api/models/{local['id']}/", headers=started.first.headers)
    assert response.status == 200
    assert await response.read() == trained(1)


@pytest.mark.parametrize("round_", ["1", "5"])
async def test_update_wrong_round_conflicts(api: TestClient, started: Round, round_: str) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    status, body = await post_update(api, started.first, started.model_id,
                                     update_form(round_=round_, content=trained(1)))
    assert status == 409, body
    assert "round" in body["detail"]
    assert await snapshot(api, started.actor, started.training_id) == before


@pytest.mark.parametrize("who", ["stranger", "actor"])
async def test_update_from_non_participant_forbidden(api: TestClient, started: Round, who: str) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    account = started.stranger if who == "stranger" else started.actor
    status, body = await post_update(api, account, started.model_id, update_form(content=trained(1)))
    assert status == 403, body
    assert isinstance(body["detail"], str)
    assert await snapshot(api, started.actor, started.training_id) == before


async def test_update_to_unknown_model_not_found(api: TestClient, started: Round) -> None:
    status, body = await post_update(api, started.first, str(uuid4()), update_form(content=trained(1)))
    assert status == 404, body
    assert isinstance(body["detail"], str)


async def test_update_to_model_without_training_not_found(api: TestClient, started: Round) -> None:
    lone_model = await upload_model(api, started.actor, model_bytes())
    status, body = await post_update(api, started.first, lone_model, update_form(content=trained(1)))
    assert status == 404, body
    assert "training" in body["detail"]
    assert (await training_models(api, started.actor, started.training_id))[0]["type"] == "GLOBAL"


async def test_update_before_start_conflicts(api: TestClient, silent: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    training_id = await create_training(api, actor, model_id, clients=[c.account.id for c in silent])
    before = await snapshot(api, actor, training_id)
    status, body = await post_update(api, silent[0].account, model_id, update_form(content=trained(1)))
    assert status == 409, body
    assert "state" in body["detail"]
    assert await snapshot(api, actor, training_id) == before
    assert (await get_training(api, actor, training_id))["state"] == "I"


async def test_pickle_update_refused_naming_formats(api: TestClient, started: Round) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    pickle_bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94K\x01s."
    status, body = await post_update(api, started.first, started.model_id, update_form(content=pickle_bytes))
    assert status == 400, body
    assert "safetensors" in body["detail"] and ".npz" in body["detail"]
    assert await snapshot(api, started.actor, started.training_id) == before


MISMATCHES = {
    "tensor_shape": ({"layer.weight": np.zeros((2, 3), np.float32), "layer.bias": np.zeros(3, np.float32)},
                     "layer.weight"),
    "tensor_dtype": ({"layer.weight": np.zeros((3, 2), np.float32), "layer.bias": np.zeros(3, np.float64)},
                     "layer.bias"),
    "tensor_missing": ({"layer.weight": np.zeros((3, 2), np.float32), "layer.b": np.zeros(3, np.float32)},
                       "layer.bias"),
    "tensor_unexpected": ({**GLOBAL_TENSORS, "layer.extra": np.zeros(1, np.float32)}, "layer.extra"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHES))
async def test_mismatched_tensor_refused(api: TestClient, started: Round, kind: str) -> None:
    tensors, name = MISMATCHES[kind]
    before = await snapshot(api, started.actor, started.training_id)
    status, body = await post_update(api, started.first, started.model_id,
                                     update_form(content=dump_tensors(tensors)))
    assert status == 400, body
    assert name in body["detail"]
    assert body["errors"][0]["type"] == kind
    assert name in body["errors"][0]["loc"]
    assert await snapshot(api, started.actor, started.training_id) == before


BAD_UPDATE_METRICS = {
    "lengths differ": (("metric_names", "loss"), ("metric_names", "accuracy"), ("metric_values", "0.5")),
    "name repeated": (("metric_names", "loss"), ("metric_names", "loss"),
                      ("metric_values", "0.5"), ("metric_values", "0.5")),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATE_METRICS))
async def test_update_bad_metrics_refused_and_nothing_stored(api: TestClient, started: Round, case: str) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    status, body = await post_update(api, started.first, started.model_id,
                                     update_form(content=trained(1), extra=BAD_UPDATE_METRICS[case]))
    assert status == 400, body
    assert "metric" in body["detail"].lower() or "length" in body["detail"]
    assert await snapshot(api, started.actor, started.training_id) == before


@pytest.mark.parametrize("case", sorted(BAD_UPDATE_METRICS))
async def test_update_after_bad_metrics_refusal_accepted(api: TestClient, started: Round, case: str) -> None:
    status, body = await post_update(api, started.first, started.model_id,
                                     update_form(content=trained(1), extra=BAD_UPDATE_METRICS[case]))
    assert status == 400, body
    # The refused request stored nothing, so the participant's real (different) update is its first.
    status, body = await post_update(api, started.first, started.model_id, update_form(content=trained(2)))
    assert (status, body) == (201, {"detail": "Model Update Accepted"})
    [local] = [e for e in await training_models(api, started.actor, started.training_id) if e["type"] == "LOCAL"]
    assert local["sha256"] == hashlib.sha256(trained(2)).hexdigest()


async def test_update_bracket_metric_spelling_accepted(api: TestClient, started: Round) -> None:
    form = update_form(content=trained(1), extra=(("metric_names[]", "loss"), ("metric_names[]", "accuracy"),
                                                  ("metric_values[]", "0.25"), ("metric_values[]", "0.75")))
    status, body = await post_update(api, started.first, started.model_id, form)
    assert (status, body) == (201, {"detail": "Model Update Accepted"})
    [local] = [e for e in await training_models(api, started.actor, started.training_id) if e["type"] == "LOCAL"]
    metrics = await metrics_of(api, started.first, local["id"])
    assert {(m["key"], m["value_float"], m["step"], m["reporter"]) for m in metrics} == {
        ("loss", 0.25, 0, started.first.id), ("accuracy", 0.75, 0, started.first.id)}


# 2. Start needs a global model in an accepted format


async def test_start_refused_for_unreadable_global_model(api: TestClient, silent: list[SimulatedClient],
                                                         database_url: str) -> None:
    """A model stored before uploads were checked, in no accepted format (today such an upload is a 400)."""
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor)
    mongo = make_client(database_url)
    try:
        await mongo[database_name(database_url, "x")]["models"].update_one(
            {"_id": UUID(model_id)},
            {"$set": {"format": None, "format_problem": "Unsupported model file: the file is empty.", "tensors": []}})
    finally:
        await mongo.close()
    training_id = await create_training(api, actor, model_id, clients=[silent[0].account.id])
    response = await api.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 409, await response.text()
    assert isinstance((await response.json())["detail"], str)
    training = await get_training(api, actor, training_id)
    assert training["state"] == "I"
    assert silent[0].received == []


# 3. Metrics


def metrics_request(kind: str, names: list[str], values: list[Any]) -> dict[str, Any]:
    """Keyword arguments of a metrics POST in one of the three accepted body encodings."""
    if kind == "json":
        return {"json": {"metric_names": names, "metric_values": values}}
    pairs = [("metric_names", name) for name in names] + [("metric_values", str(value)) for value in values]
    if kind == "multipart":
        form = FormData(default_to_multipart=True)
        for name, value in pairs:
            form.add_field(name, value)
        return {"data": form}
    return {"data": urlencode(pairs), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


async def post_metrics(api: TestClient, account: Account, model_id: str, kind: str, names: list[str],
                       values: list[Any]) -> tuple[int, Any]:
    arguments = metrics_request(kind, names, values)
    headers = {**arguments.pop("headers", {}), **account.headers}
    response = await api.post(f"/api/models/{model_id}/metrics/", headers=headers, **arguments)
    return response.status, await response.json()


@pytest.mark.parametrize("kind", ["json", "multipart", "urlencoded"])
async def test_metrics_accepted_in_each_encoding(api: TestClient, started: Round, kind: str) -> None:
    status, body = await post_metrics(api, started.first, started.model_id, kind, ["a", "b"], [0.5, 2.0])
    assert (status, body) == (201, {"detail": "Model Metrics Upload Accepted", "model_id": started.model_id})
    metrics = await metrics_of(api, started.actor, started.model_id)
    assert sorted((m["key"], m["value_float"], m["reporter"]) for m in metrics) == [
        ("a", 0.5, started.first.id), ("b", 2.0, started.first.id)]


BAD_METRICS = [(["a", "b"], [1.0]), (["a"], [1.0, 2.0]), (["a"], ["abc"]), (["a"], ["1,5"])]


@pytest.mark.parametrize("kind", ["json", "multipart", "urlencoded"])
async def test_metrics_invalid_refused(api: TestClient, started: Round, kind: str) -> None:
    for names, values in BAD_METRICS:
        status, body = await post_metrics(api, started.first, started.model_id, kind, names, values)
        assert status == 400, (names, values, body)
        assert isinstance(body["detail"], str)
    assert await metrics_of(api, started.actor, started.model_id) == []


async def test_metrics_non_finite_refused(api: TestClient, started: Round) -> None:
    for kind in ("multipart", "urlencoded"):
        for value in ("nan", "inf", "-inf", "Infinity"):
            status, body = await post_metrics(api, started.first, started.model_id, kind, ["a"], [value])
            assert status == 400, (kind, value, body)
    for raw in ("NaN", "Infinity", "-Infinity", "1e999"):
        body_text = '{"metric_names": ["a"], "metric_values": [' + raw + "]}"
        headers = {**started.first.headers, "Content-Type": "application/json"}
        response = await api.post(f"/api/models/{started.model_id}/metrics/", data=body_text, headers=headers)
        assert response.status == 400, (raw, await response.text())
    assert await metrics_of(api, started.actor, started.model_id) == []


async def test_metrics_from_stranger_forbidden(api: TestClient, started: Round) -> None:
    status, body = await post_metrics(api, started.stranger, started.model_id, "json", ["a"], [1.0])
    assert status == 403, body
    assert isinstance(body["detail"], str)
    assert await metrics_of(api, started.actor, started.model_id) == []


async def test_metrics_listing_and_access(api: TestClient, started: Round) -> None:
    status, _ = await post_metrics(api, started.first, started.model_id, "json", ["accuracy"], [0.9])
    assert status == 201
    for reader in (started.actor, started.first, started.second):
        [metric] = await metrics_of(api, reader, started.model_id)
        assert set(metric) == METRIC_FIELDS
        assert (metric["key"], metric["value_float"], metric["step"], metric["reporter"]) == (
            "accuracy", 0.9, 0, started.first.id)
    response = await api.get(f"/api/models/{started.model_id}/metrics/", headers=started.stranger.headers)
    assert response.status == 403
    assert isinstance((await response.json())["detail"], str)


async def test_metrics_resend_same_is_idempotent_and_change_conflicts(api: TestClient, started: Round) -> None:
    for _ in range(2):
        status, body = await post_metrics(api, started.first, started.model_id, "json", ["accuracy"], [0.9])
        assert (status, body) == (201, {"detail": "Model Metrics Upload Accepted", "model_id": started.model_id})
    assert len(await metrics_of(api, started.actor, started.model_id)) == 1
    status, body = await post_metrics(api, started.first, started.model_id, "json", ["accuracy"], [0.8])
    assert status == 409, body
    assert isinstance(body["detail"], str)
    [metric] = await metrics_of(api, started.actor, started.model_id)
    assert metric["value_float"] == 0.9
    # Another reporter may give the same key its own value.
    status, _ = await post_metrics(api, started.second, started.model_id, "json", ["accuracy"], [0.8])
    assert status == 201
    assert len(await metrics_of(api, started.actor, started.model_id)) == 2


# 4. SWAG statistics


def swag_form(second: bool = True) -> FormData:
    form = FormData(default_to_multipart=True)
    form.add_field("round", "0")
    form.add_field("sample_size", "1")
    form.add_field("first_moment_file", trained(1), filename="first", content_type="application/octet-stream")
    if second:
        form.add_field("second_moment_file", trained(1), filename="second", content_type="application/octet-stream")
    return form


async def test_swag_outside_state_s_conflicts(api: TestClient, started: Round) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    response = await api.post(f"/api/models/{started.model_id}/swag/", data=swag_form(), headers=started.first.headers)
    assert response.status == 409, await response.text()
    assert isinstance((await response.json())["detail"], str)
    assert await snapshot(api, started.actor, started.training_id) == before


async def test_swag_missing_second_file_refused(api: TestClient, started: Round) -> None:
    response = await api.post(f"/api/models/{started.model_id}/swag/", data=swag_form(second=False),
                              headers=started.first.headers)
    assert response.status == 400, await response.text()
    assert "second_moment_file" in (await response.json())["detail"]


# 5. A training's models


async def test_training_models_and_latest(api: TestClient, silent: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    stranger = await register(api)
    first, second = silent[0].account, silent[1].account
    training_id = await run_training(api, actor, silent, target_num_updates=2,
                                     options={"keep_local_models": True, "skip_model_tests": True})
    training = await get_training(api, actor, training_id)
    model_id = training["model"]
    for account, delta, size in ((first, 1, 2), (second, 2, 3)):
        status, body = await post_update(api, account, model_id, update_form(sample_size=str(size),
                                                                             content=trained(delta)))
        assert status == 201, body
    await wait_for_phase(api, actor, training_id, 1, "updates")
    status, body = await post_update(api, first, model_id, update_form(round_="1", sample_size="4",
                                                                       content=trained(5)))
    assert status == 201, body

    models = await training_models(api, actor, training_id)
    [global_entry] = [entry for entry in models if entry["type"] == "GLOBAL"]
    assert (global_entry["id"], global_entry["owner"]) == (model_id, actor.id)
    local = sorted((e["owner"], e["round"], e["sample_size"], e["base_model"]) for e in models if e["type"] == "LOCAL")
    assert local == sorted([(first.id, 0, 2, model_id), (second.id, 0, 3, model_id), (first.id, 1, 4, model_id)])

    latest = await training_models(api, first, training_id, latest=True)
    assert [entry["type"] for entry in latest].count("GLOBAL") == 1
    newest = sorted((e["owner"], e["round"], e["sample_size"]) for e in latest if e["type"] == "LOCAL")
    assert newest == sorted([(first.id, 1, 4), (second.id, 0, 3)])

    for path in ("models/", "models/latest/"):
        response = await api.get(f"/api/trainings/{training_id}/{path}", headers=stranger.headers)
        assert response.status == 403, await response.text()
        assert isinstance((await response.json())["detail"], str)

    [update] = [e for e in models if e["type"] == "LOCAL" and (e["owner"], e["round"]) == (first.id, 1)]
    for reader in (first, actor):
        response = await api.get(f"/api/models/{update['id']}/", headers=reader.headers)
        assert response.status == 200, await response.text()
        assert await response.read() == trained(5)
    response = await api.get(f"/api/models/{update['id']}/", headers=stranger.headers)
    assert response.status == 403


# 6. Events


async def test_events_json_paging_and_access(api: TestClient, started: Round) -> None:
    events = await events_of(api, started.actor, started.training_id)
    types = [event["type"] for event in events]
    assert "state_changed" in types and "round_started" in types
    for event in events:
        assert set(event) == EVENT_FIELDS
        assert event["training"] == started.training_id
    assert await events_of(api, started.first, started.training_id) == events

    response = await api.get(f"/api/trainings/{started.training_id}/events/?after={events[0]['id']}",
                             headers=started.actor.headers)
    assert response.status == 200
    assert await response.json() == events[1:]

    for query in ("after=garbage", "limit=0"):
        response = await api.get(f"/api/trainings/{started.training_id}/events/?{query}",
                                 headers=started.actor.headers)
        assert response.status == 400, (query, await response.text())
        assert isinstance((await response.json())["detail"], str)
    response = await api.get(f"/api/trainings/{started.training_id}/events/", headers=started.stranger.headers)
    assert response.status == 403


async def test_events_stream_backlog_live_and_end(api: TestClient, started: Round) -> None:
    backlog = await events_of(api, started.actor, started.training_id)
    headers = {**started.actor.headers, "Accept": "text/event-stream"}
    async with asyncio.timeout(SSE_SECONDS):
        response = await api.get(f"/api/trainings/{started.training_id}/events/", headers=headers)
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for expected in backlog:
            frame = await next_frame(response)
            assert frame is not None
            assert (frame["id"], frame["event"]) == (expected["id"], expected["type"])
            assert json.loads(frame["data"]) == expected

        # Live: the round's progress, then an upload made while the stream is open shows in it (no stored
        # event per upload: the progress frame carries no id, so Last-Event-ID still names a stored event).
        frame = await next_frame(response)
        assert frame is not None and frame["event"] == "round_progress" and "id" not in frame, frame
        assert json.loads(frame["data"])["data"] == {"phase": "updates", "arrived": 0, "expected": 2}
        status, _ = await post_update(api, started.first, started.model_id, update_form(content=trained(1)))
        assert status == 201
        frame = await next_frame(response)
        assert frame is not None and frame["event"] == "round_progress", frame
        data = json.loads(frame["data"])
        assert (data["round"], data["data"]) == (0, {"phase": "updates", "arrived": 1, "expected": 2}), data

        cancel = await api.post(f"/api/trainings/{started.training_id}/cancel/", headers=started.actor.headers)
        assert cancel.status == 202, await cancel.text()
        rest = []
        while (frame := await next_frame(response)) is not None:
            rest.append(frame)
        assert any(json.loads(f["data"]).get("data", {}).get("state") == "E" for f in rest), rest
    response.release()


async def test_events_stream_ends_when_completed(api: TestClient, started: Round) -> None:
    for account, delta in ((started.first, 1), (started.second, 2)):
        status, _ = await post_update(api, account, started.model_id, update_form(content=trained(delta)))
        assert status == 201
    await wait_for_phase(api, started.actor, started.training_id, 1, "testing")
    headers = {**started.actor.headers, "Accept": "text/event-stream"}
    async with asyncio.timeout(SSE_SECONDS):
        response = await api.get(f"/api/trainings/{started.training_id}/events/", headers=headers)
        assert response.status == 200
        for account in (started.first, started.second):
            status, _ = await post_metrics(api, account, started.model_id, "json", ["accuracy"], [0.5])
            assert status == 201
        frames = []
        while (frame := await next_frame(response)) is not None:
            frames.append(json.loads(frame["data"]))
    types = [frame["type"] for frame in frames]
    assert "testing_completed" in types, types
    assert {"type": "state_changed", "state": "C"} in [{"type": f["type"], **f["data"]} for f in frames], frames
    assert (await get_training(api, started.actor, started.training_id))["state"] == "C"


async def test_events_stored_while_the_stream_checks_the_end_are_still_sent(
    api: TestClient, started: Round, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream ends once the training ended and its effects (its events among them) are applied. An
    event read that came just before the last events were stored must not end it without them: the
    stream's first read is made to see nothing, as that read would, and the events still arrive."""
    for account, delta in ((started.first, 1), (started.second, 2)):
        status, _ = await post_update(api, account, started.model_id, update_form(content=trained(delta)))
        assert status == 201
    await wait_for_phase(api, started.actor, started.training_id, 1, "testing")
    for account in (started.first, started.second):
        status, _ = await post_metrics(api, account, started.model_id, "json", ["accuracy"], [0.5])
        assert status == 201
    stored: list[dict[str, Any]] = []

    async def ended() -> bool:  # the last step's events are stored once its effects are applied
        stored[:] = await events_of(api, started.actor, started.training_id)
        return any(event["type"] == "state_changed" and event["data"].get("state") == "C" for event in stored)

    await wait_until(ended, "the training's end in its events")
    reads = 0
    real_list_events = rounds_routes.list_events

    async def first_read_too_early(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        return [] if reads == 1 else await real_list_events(*args, **kwargs)

    monkeypatch.setattr(rounds_routes, "list_events", first_read_too_early)
    headers = {**started.actor.headers, "Accept": "text/event-stream"}
    async with asyncio.timeout(SSE_SECONDS):
        response = await api.get(f"/api/trainings/{started.training_id}/events/?after={stored[-3]['id']}",
                                 headers=headers)
        assert response.status == 200
        frames = []
        while (frame := await next_frame(response)) is not None:
            frames.append(json.loads(frame["data"]))
    # Any event stored after the list above follows them.
    assert [frame["id"] for frame in frames][:2] == [event["id"] for event in stored[-2:]], frames


# 7. The DLR reference client's requests, with Basic authentication


async def test_dlr_client_round_with_basic_auth(api: TestClient, silent: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, silent, target_num_updates=1)
    await wait_for_notification(silent, "UPDATE_ROUND_START")
    sizes = {0: 1, 1: 3}
    for client in silent:
        body = client.received[-1]["body"]
        global_id, round_ = body["global_model_uuid"], body["round"]
        response = await api.get(f"/api/models/{global_id}/", headers=basic(client.account))
        assert response.status == 200, await response.text()
        tensors = load_tensors(await response.read())
        update = dump_tensors({name: np.array(value) + np.float32(client.index + 1) for name, value in tensors.items()})
        local_metrics = {"loss": 0.5, "accuracy": 0.75}
        texts = [("owner", client.account.id), ("round", str(round_)), ("sample_size", str(sizes[client.index])),
                 *[("metric_names", name) for name in local_metrics],
                 *[("metric_values", str(float(value))) for value in local_metrics.values()]]
        payload, content_type = dlr_multipart(texts, update)
        file_part = payload[payload.index(b'name="model_file"'):]
        assert b"Content-Type" not in file_part[:file_part.index(b"\r\n\r\n")]
        response = await api.post(f"/api/models/{global_id}/", data=payload,
                                  headers={**basic(client.account), "Content-Type": content_type})
        assert response.status == 201, await response.text()

    await wait_for_notification(silent, "MODEL_TEST_ROUND")
    for client in silent:
        body = client.received[-1]["body"]
        test_metrics = {"accuracy": 0.9, "f1": 0.8}
        form = urlencode([*[("metric_names", name) for name in test_metrics],
                          *[("metric_values", str(float(value))) for value in test_metrics.values()]])
        response = await api.post(f"/api/models/{body['global_model_uuid']}/metrics/", data=form, headers={
            **basic(client.account), "Content-Type": "application/x-www-form-urlencoded"})
        assert response.status == 201, await response.text()

    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    response = await api.get(f"/api/models/{final['model']}/", headers=basic(silent[0].account))
    assert response.status == 200
    weights = load_tensors(await response.read())
    # FedAvg of +1 (sample size 1) and +2 (sample size 3): 7/4.
    for name, value in weights.items():
        assert value.dtype == GLOBAL_TENSORS[name].dtype
        np.testing.assert_allclose(value, np.full(GLOBAL_TENSORS[name].shape, 7 / 4), rtol=1e-6)
    metrics = await metrics_of(api, actor, final["model"])
    assert sorted((m["key"], m["reporter"]) for m in metrics if m["step"] == 1) == sorted(
        (key, client.account.id) for key in ("accuracy", "f1") for client in silent)


# 8. Limits of contributions and engine options


@pytest.mark.parametrize(("round_", "sample_size", "extra"), [
    ("10000001", "1", ()),
    ("0", str(2**53 + 1), ()),
    ("0", "1", tuple(pair for i in range(101) for pair in (("metric_names", f"m{i}"), ("metric_values", "1.0")))),
    ("0", "1", (("metric_names", "x" * 65), ("metric_values", "1.0"))),
])
async def test_update_past_a_limit_refused(
    api: TestClient, started: Round, round_: str, sample_size: str, extra: tuple[tuple[str, str], ...]
) -> None:
    before = await snapshot(api, started.actor, started.training_id)
    status, body = await post_update(api, started.first, started.model_id,
                                     update_form(round_, sample_size, trained(1), extra))
    assert status == 400, body
    assert "detail" in body
    assert await snapshot(api, started.actor, started.training_id) == before


async def test_metrics_past_the_limit_refused(api: TestClient, started: Round) -> None:
    payload = {"metric_names": [f"m{i}" for i in range(101)], "metric_values": [1.0] * 101}
    response = await api.post(f"/api/models/{started.model_id}/metrics/", json=payload, headers=started.first.headers)
    assert response.status == 400, await response.text()
    assert await metrics_of(api, started.actor, started.model_id) == []


@pytest.mark.parametrize("options", [
    {"fedprox_mu": -0.1}, {"fedprox_mu": 1e7}, {"fedprox_mu": "0.1"},
    {"round_timeout_seconds": 0}, {"round_timeout_seconds": 366 * 86_400 + 1}, {"round_timeout_seconds": 1.5},
    {"min_updates": 0}, {"min_updates": 1_000_001}, {"keep_local_models": "yes"}, {"skip_model_tests": 1},
])
async def test_engine_options_past_their_limits_refused(api: TestClient, options: dict[str, Any]) -> None:
    actor = await register(api, actor=True)
    model_id = await upload_model(api, actor, model_bytes())
    response = await api.post("/api/trainings/", json={"model_id": model_id, "target_num_updates": 1,
                                                        "options": options}, headers=actor.headers)
    assert response.status == 400, await response.text()
    assert (await response.json())["errors"][0]["loc"][:2] == ["options", next(iter(options))]
    listed = await api.get("/api/trainings/", headers=actor.headers)
    assert await listed.json() == []


async def test_metric_objects_have_the_fields_dlr_frontend_draws_from(api: TestClient, started: Round) -> None:
    """DLR's web frontend charts `value_float` of DLR's metric objects (before: empty charts)."""
    status, _ = await post_metrics(api, started.first, started.model_id, "json", ["accuracy", "loss"], [0.9, 0.25])
    assert status == 201
    metrics = await metrics_of(api, started.actor, started.model_id)
    assert {frozenset(metric) for metric in metrics} == {frozenset(
        {"id", "model", "identifier", "key", "value_float", "value_binary", "step", "reporter", "created_at"})}
    by_key = {metric["key"]: metric for metric in metrics}
    assert (by_key["accuracy"]["value_float"], by_key["loss"]["value_float"]) == (0.9, 0.25)
    for metric in metrics:
        assert (metric["model"], metric["step"], metric["reporter"]) == (started.model_id, 0, started.first.id)
        assert metric["value_binary"] is None and metric["identifier"] is None
    assert len({metric["id"] for metric in metrics}) == 2
