"""Trainings after creation: PATCH with If-Match, participants, start, cancel and last_update."""

import re
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from fltraining.schemas.common import iso_z
from tests.helpers import Account, create_training, get_training, register, update_stored_training

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
LONG_AGO_TEXT = "2000-01-01T00:00:00.000Z"
DATETIME_START = re.compile(r"^\d{4}-\d\d-\d\dT")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REGISTERED = {"detail": "Users registered as participants!"}
REMOVED = {"detail": "Users removed from training participants!"}


@given(st.datetimes(timezones=st.one_of(st.none(), st.timezones())))
def test_datetimes_are_written_as_utc_milliseconds_with_z(value: datetime) -> None:
    text = iso_z(value)
    assert ISO_Z.match(text), text
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    # Milliseconds truncated, never rounded up into the next second (or the next day).
    assert datetime.fromisoformat(text) == utc.replace(microsecond=utc.microsecond // 1000 * 1000)


async def put_clients(
    client: TestClient, actor: Account, training_id: str, ids: list[str]
) -> tuple[int, Any]:
    """PUT /clients/ and return status and body."""
    response = await client.put(
        f"/api/trainings/{training_id}/clients/", json={"clients": ids}, headers=actor.headers
    )
    return response.status, await response.json()


async def delete_clients(
    client: TestClient, actor: Account, training_id: str, ids: list[str]
) -> tuple[int, Any]:
    """DELETE /clients/ and return status and body."""
    response = await client.delete(
        f"/api/trainings/{training_id}/clients/", json={"clients": ids}, headers=actor.headers
    )
    return response.status, await response.json()


async def test_patch_changes_settings_and_returns_the_training(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor, options={"keep": 1, "lr": 0.5})
    url = f"/api/trainings/{training_id}/"
    before_response = await client.get(url, headers=actor.headers)
    before = await before_response.json()
    body = {
        "target_num_updates": 11,
        "metric_names": ["acc", "f1"],
        "aggregation_method": "FedDC",
        "uncertainty_method": "MC_DROPOUT",
        "options": {"lr": 0.1, "nested": {"a": [1, 2]}},
    }
    response = await client.patch(url, json=body, headers=actor.headers)
    assert response.status == 200, await response.text()
    assert response.headers["ETag"] != before_response.headers["ETag"]
    patched = await response.json()
    for key, value in body.items():
        assert patched[key] == value, key
    assert patched["options"] == {"lr": 0.1, "nested": {"a": [1, 2]}}  # replaced, not merged
    assert patched["local_models_expected"] == 0
    unchanged = {"id", "model", "actor", "participants", "state", "created_at", "locked", "state_detail"}
    assert {key: patched[key] for key in unchanged} == {key: before[key] for key in unchanged}
    assert await get_training(client, actor, training_id) == patched
    # An empty PATCH changes nothing and still answers with the training.
    response = await client.patch(url, json={}, headers=actor.headers)
    assert response.status == 200
    assert await response.json() == patched


@pytest.mark.parametrize(
    "body",
    [
        {"target_num_updates": None},
        {"metric_names": None},
        {"aggregation_method": None},
        {"uncertainty_method": None},
        {"options": None},
        {"state": "O"},
        {"participants": []},
        {"model_id": "00000000-0000-0000-0000-000000000000"},
        {"target_num_updates": "5"},
        {"target_num_updates": 0},
        {"aggregation_method": "fedavg"},
        {"options": {"$set": 1}},
        {"options": {"a": [{"b.c": 1}]}},
        {"options": {"daisy_chain_period": -1}, "target_num_updates": 2},
        {"options": {"daisy_chain_period": 2**50}, "target_num_updates": 1_000_000},
        {"options": {"skip_model_tests": "yes"}},
    ],
    ids=lambda body: ",".join(f"{k}={v!r}" for k, v in body.items()),
)
async def test_patch_rejects_bad_bodies_and_changes_nothing(client: TestClient, body: dict[str, Any]) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor, options={"lr": 0.5})
    before = await get_training(client, actor, training_id)
    response = await client.patch(f"/api/trainings/{training_id}/", json=body, headers=actor.headers)
    assert response.status == 400, await response.text()
    error = await response.json()
    assert isinstance(error["detail"], str)
    assert error["errors"] and all("loc" in item for item in error["errors"])
    assert await get_training(client, actor, training_id) == before


async def test_patch_rejects_bodies_that_are_not_json_objects(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/"
    for raw, content_type, status in [
        (b"{oops", "application/json", 400),
        (b"[1]", "application/json", 400),
        (b"", "application/json", 400),
        (b'{"target_num_updates": 9}', "text/plain", 415),
    ]:
        response = await client.patch(url, data=raw, headers={**actor.headers, "Content-Type": content_type})
        assert response.status == status, raw
        assert "detail" in await response.json()
    assert (await get_training(client, actor, training_id))["target_num_updates"] == 3


async def test_patch_is_for_the_actor_in_state_i_only(client: TestClient) -> None:
    actor, participant, stranger = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[participant.id])
    url = f"/api/trainings/{training_id}/"
    for account in (participant, stranger):
        response = await client.patch(url, json={"target_num_updates": 9}, headers=account.headers)
        assert response.status == 403
        assert "detail" in await response.json()
    response = await client.patch(
        f"/api/trainings/{uuid4()}/", json={"target_num_updates": 9}, headers=actor.headers
    )
    assert response.status == 404
    assert (await get_training(client, actor, training_id))["target_num_updates"] == 3

    assert (await client.post(url + "start/", headers=actor.headers)).status == 202
    response = await client.patch(url, json={"target_num_updates": 9}, headers=actor.headers)
    assert response.status == 409
    assert "detail" in await response.json()
    assert (await client.post(url + "cancel/", headers=actor.headers)).status == 202
    response = await client.patch(url, json={"metric_names": ["x"]}, headers=actor.headers)
    assert response.status == 409
    training = await get_training(client, actor, training_id)
    assert (training["target_num_updates"], training["metric_names"]) == (3, [])


@pytest.mark.parametrize("state", ["C", "S"])
async def test_patch_is_409_in_states_c_and_s(client: TestClient, database_url: str, state: str) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    await update_stored_training(database_url, training_id, state=state)
    response = await client.patch(
        f"/api/trainings/{training_id}/", json={"target_num_updates": 9}, headers=actor.headers
    )
    assert response.status == 409
    assert (await get_training(client, actor, training_id))["target_num_updates"] == 3


async def test_patch_with_if_match_detects_lost_updates(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/"
    first = (await client.get(url, headers=actor.headers)).headers["ETag"]

    # Someone else changes the training: the ETag read before is stale now.
    response = await client.patch(url, json={"metric_names": ["loss"]}, headers=actor.headers)
    assert response.status == 200
    second = response.headers["ETag"]
    assert second != first
    assert (await client.get(url, headers=actor.headers)).headers["ETag"] == second
    response = await client.patch(
        url, json={"target_num_updates": 9}, headers={**actor.headers, "If-Match": first}
    )
    assert response.status == 412
    assert "detail" in await response.json()
    assert (await get_training(client, actor, training_id))["target_num_updates"] == 3

    # Any write makes an ETag stale, not only a PATCH.
    status, _ = await put_clients(client, actor, training_id, [participant.id])
    assert status == 202
    response = await client.patch(
        url, json={"target_num_updates": 9}, headers={**actor.headers, "If-Match": second}
    )
    assert response.status == 412
    current = (await client.get(url, headers=actor.headers)).headers["ETag"]
    assert current != second

    response = await client.patch(
        url, json={"target_num_updates": 9}, headers={**actor.headers, "If-Match": current}
    )
    assert response.status == 200
    newest = response.headers["ETag"]
    assert newest != current
    assert (await response.json())["target_num_updates"] == 9
    assert (await client.get(url, headers=actor.headers)).headers["ETag"] == newest
    # The ETag just used is spent.
    response = await client.patch(
        url, json={"target_num_updates": 4}, headers={**actor.headers, "If-Match": current}
    )
    assert response.status == 412
    for tag in (newest, "*"):
        response = await client.patch(
            url, json={"metric_names": [tag]}, headers={**actor.headers, "If-Match": tag}
        )
        assert response.status == 200, tag
    response = await client.patch(
        url, json={"metric_names": ["z"]}, headers={**actor.headers, "If-Match": '"nonsense"'}
    )
    assert response.status == 412
    assert (await get_training(client, actor, training_id))["metric_names"] == ["*"]


@pytest.mark.parametrize("if_match", ["", '"nonsense"', '"7"', "*"])
async def test_a_missing_training_is_404_whatever_if_match_says(client: TestClient, if_match: str) -> None:
    """RFC 9110: preconditions apply to a resource that exists (found by schemathesis: an empty If-Match
    on an unknown id answered 412)."""
    actor = await register(client)
    response = await client.patch(f"/api/trainings/{uuid4()}/", json={"metric_names": ["x"]},
                                  headers={**actor.headers, "If-Match": if_match})
    assert response.status == 404
    assert "detail" in await response.json()


async def test_an_empty_if_match_on_an_existing_training_is_412(client: TestClient) -> None:
    actor = await register(client)
    training_id = await create_training(client, actor)
    response = await client.patch(f"/api/trainings/{training_id}/", json={"metric_names": ["x"]},
                                  headers={**actor.headers, "If-Match": ""})
    assert response.status == 412
    assert (await get_training(client, actor, training_id))["metric_names"] == []


async def test_clients_can_be_registered_and_removed(client: TestClient) -> None:
    actor = await register(client)
    first, second, third = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor)

    assert await put_clients(client, actor, training_id, [first.id]) == (202, REGISTERED)
    # Registering again is idempotent; duplicates within one request count once.
    assert await put_clients(client, actor, training_id, [first.id, second.id, second.id]) == (
        202,
        REGISTERED,
    )
    assert await put_clients(client, actor, training_id, [first.id]) == (202, REGISTERED)
    assert await put_clients(client, actor, training_id, []) == (202, REGISTERED)
    training = await get_training(client, actor, training_id)
    assert training["participants"] == [first.id, second.id]
    assert training["local_models_expected"] == 2
    assert (await get_training(client, second, training_id))["participants"] == [first.id, second.id]

    assert await delete_clients(client, actor, training_id, [first.id, first.id]) == (200, REMOVED)
    assert await delete_clients(client, actor, training_id, [third.id]) == (200, REMOVED)  # not a participant
    assert (await get_training(client, actor, training_id))["participants"] == [second.id]
    response = await client.get(f"/api/trainings/{training_id}/", headers=first.headers)
    assert response.status == 403
    assert await put_clients(client, actor, training_id, [third.id, first.id]) == (202, REGISTERED)
    assert (await get_training(client, actor, training_id))["participants"] == [second.id, third.id, first.id]


async def test_unknown_or_malformed_clients_change_nothing(client: TestClient) -> None:
    actor, first, second = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[first.id])
    url = f"/api/trainings/{training_id}/clients/"
    for call in (put_clients, delete_clients):
        status, body = await call(client, actor, training_id, [second.id, str(uuid4())])
        assert (status, body) == (400, {"detail": "Not all provided users were found!"})
        status, body = await call(client, actor, training_id, [first.id, str(uuid4())])
        assert (status, body) == (400, {"detail": "Not all provided users were found!"})
    for bad in (
        {"clients": ["nope"]},
        {"clients": second.id},
        {},
        {"clients": [second.id], "extra": 1},
        {"clients": None},
    ):
        for method in ("PUT", "DELETE"):
            response = await client.request(method, url, json=bad, headers=actor.headers)
            assert response.status == 400, (method, bad)
            assert "detail" in await response.json()
    response = await client.put(url, data="[]", headers={**actor.headers, "Content-Type": "application/json"})
    assert response.status == 400
    assert (await get_training(client, actor, training_id))["participants"] == [first.id]
    response = await client.put(
        f"/api/trainings/{uuid4()}/clients/", json={"clients": [first.id]}, headers=actor.headers
    )
    assert response.status == 404


async def test_clients_are_for_the_actor_only(client: TestClient) -> None:
    actor, participant, stranger, newcomer = (
        await register(client),
        await register(client),
        await register(client),
        await register(client),
    )
    training_id = await create_training(client, actor, clients=[participant.id])
    for account in (participant, stranger):
        status, body = await put_clients(client, account, training_id, [newcomer.id, account.id])
        assert status == 403 and "detail" in body
        status, body = await delete_clients(client, account, training_id, [participant.id])
        assert status == 403 and "detail" in body
    assert (await get_training(client, actor, training_id))["participants"] == [participant.id]


async def test_clients_change_in_states_i_o_s_but_not_c_e(client: TestClient, database_url: str) -> None:
    actor, first, second = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[first.id])
    assert (await client.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)).status == 202
    assert await put_clients(client, actor, training_id, [second.id]) == (202, REGISTERED)
    assert await delete_clients(client, actor, training_id, [second.id]) == (200, REMOVED)
    await update_stored_training(database_url, training_id, state="S")
    assert await put_clients(client, actor, training_id, [second.id]) == (202, REGISTERED)
    assert await delete_clients(client, actor, training_id, [second.id]) == (200, REMOVED)

    await update_stored_training(database_url, training_id, state="C")
    for call in (put_clients, delete_clients):
        status, body = await call(client, actor, training_id, [first.id, second.id])
        assert status == 409, ("C", call.__name__)
        assert "detail" in body
    await update_stored_training(database_url, training_id, state="O")
    assert (await client.post(f"/api/trainings/{training_id}/cancel/", headers=actor.headers)).status == 202
    for call in (put_clients, delete_clients):
        status, _ = await call(client, actor, training_id, [first.id, second.id])
        assert status == 409, ("E", call.__name__)
    assert (await get_training(client, actor, training_id))["participants"] == [first.id]


async def test_start_moves_i_to_o_once_with_participants(client: TestClient) -> None:
    actor, participant, stranger = await register(client), await register(client), await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/start/"

    response = await client.post(url, headers=actor.headers)
    assert response.status == 409
    assert await response.json() == {"detail": "At least one participant must be registered!"}
    assert (await get_training(client, actor, training_id))["state"] == "I"

    assert (await put_clients(client, actor, training_id, [participant.id]))[0] == 202
    for account in (participant, stranger):
        response = await client.post(url, headers=account.headers)
        assert response.status == 403, account
        assert "detail" in await response.json()
    assert (await get_training(client, actor, training_id))["state"] == "I"

    response = await client.post(url, headers=actor.headers)
    assert response.status == 202
    assert await response.json() == {"detail": "Training started!"}
    training = await get_training(client, participant, training_id)
    assert training["state"] == "O"
    assert training["state_detail"] is None

    response = await client.post(url, headers=actor.headers)
    assert response.status == 409
    assert "detail" in await response.json()
    assert (await client.post(f"/api/trainings/{uuid4()}/start/", headers=actor.headers)).status == 404


@pytest.mark.parametrize("state", ["C", "E", "S"])
async def test_start_is_409_outside_state_i(client: TestClient, database_url: str, state: str) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[participant.id])
    await update_stored_training(database_url, training_id, state=state)
    response = await client.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)
    assert response.status == 409
    assert (await get_training(client, actor, training_id))["state"] == state


async def test_cancel_moves_i_and_o_to_e(client: TestClient) -> None:
    actor, participant, stranger = await register(client), await register(client), await register(client)
    initial = await create_training(client, actor, clients=[participant.id])
    ongoing = await create_training(client, actor, clients=[participant.id])
    assert (await client.post(f"/api/trainings/{ongoing}/start/", headers=actor.headers)).status == 202

    for training_id in (initial, ongoing):
        url = f"/api/trainings/{training_id}/cancel/"
        for account in (participant, stranger):
            response = await client.post(url, headers=account.headers)
            assert response.status == 403
        assert (await get_training(client, actor, training_id))["state"] in {"I", "O"}
        response = await client.post(url, headers=actor.headers)
        assert response.status == 202
        assert await response.json() == {"detail": "Training cancelled!"}
        training = await get_training(client, participant, training_id)
        assert training["state"] == "E"
        assert training["state_detail"]["reason"] == "cancelled"
        for value in training["state_detail"].values():
            if isinstance(value, str) and DATETIME_START.match(value):
                assert ISO_Z.match(value), training["state_detail"]
        response = await client.post(url, headers=actor.headers)
        assert response.status == 409
        assert "detail" in await response.json()
        assert (await get_training(client, actor, training_id))["state_detail"]["reason"] == "cancelled"
    assert (await client.post(f"/api/trainings/{uuid4()}/cancel/", headers=actor.headers)).status == 404


@pytest.mark.parametrize(("state", "status"), [("S", 202), ("C", 409)])
async def test_cancel_from_s_works_and_from_c_is_409(
    client: TestClient, database_url: str, state: str, status: int
) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor, clients=[participant.id])
    await update_stored_training(database_url, training_id, state=state)
    response = await client.post(f"/api/trainings/{training_id}/cancel/", headers=actor.headers)
    assert response.status == status
    training = await get_training(client, actor, training_id)
    if status == 202:
        assert (training["state"], training["state_detail"]["reason"]) == ("E", "cancelled")
    else:
        assert (training["state"], training["state_detail"]) == ("C", None)


async def test_every_write_changes_last_update(client: TestClient, database_url: str) -> None:
    actor, participant = await register(client), await register(client)
    training_id = await create_training(client, actor)
    url = f"/api/trainings/{training_id}/"
    writes = [
        ("PATCH", url, {"metric_names": ["acc"]}),
        ("PUT", url + "clients/", {"clients": [participant.id]}),
        ("DELETE", url + "clients/", {"clients": [participant.id]}),
        ("PUT", url + "clients/", {"clients": [participant.id]}),
        ("POST", url + "start/", None),
        ("PUT", url + "clients/", {"clients": [actor.id]}),
        ("POST", url + "cancel/", None),
    ]
    for method, path, body in writes:
        await update_stored_training(database_url, training_id, last_update=LONG_AGO)
        assert (await get_training(client, actor, training_id))["last_update"] == LONG_AGO_TEXT
        response = await client.request(method, path, json=body, headers=actor.headers)
        assert response.status in {200, 202}, (method, path, await response.text())
        training = await get_training(client, actor, training_id)
        assert training["last_update"] != LONG_AGO_TEXT, (method, path)
        assert training["last_update"] >= training["created_at"], (method, path)
