"""The training lists: who sees what, filters, paging, ordering and strict query parsing."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.documents import Training
from fltraining.engine.arrivals import arrived_count
from fltraining.engine.plans import expected_users
from fltraining.schemas.trainings import TrainingDetail, TrainingPublic
from routes.responses import json_document
from routes.trainings import training_detail
from tests.helpers import Account, create_training, register, update_stored_training

LISTS = ("/api/trainings/", "/api/users/trainings/")
BASE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class World:
    """Three users and five trainings in several states and methods."""

    actor: Account
    participant: Account
    stranger: Account
    initial: str  # actor's, I, FedAvg/NONE
    ongoing: str  # actor's, O, FedProx/SWAG, participant takes part
    failed: str  # actor's, E, FedDC/MC_DROPOUT
    participants_own: str  # participant's, I, FedAvg/ENSEMBLE
    strangers: str  # stranger's, I, FedProx/NONE, actor takes part


async def build_world(client: TestClient) -> World:
    """Create the trainings of the list tests through the API."""
    actor, participant, stranger = await register(client), await register(client), await register(client)
    initial = await create_training(client, actor)
    ongoing = await create_training(
        client, actor, clients=[participant.id], aggregation_method="FedProx", uncertainty_method="SWAG"
    )
    assert (await client.post(f"/api/trainings/{ongoing}/start/", headers=actor.headers)).status == 202
    failed = await create_training(client, actor, aggregation_method="FedDC", uncertainty_method="MC_DROPOUT")
    assert (await client.post(f"/api/trainings/{failed}/cancel/", headers=actor.headers)).status == 202
    participants_own = await create_training(client, participant, uncertainty_method="ENSEMBLE")
    strangers = await create_training(client, stranger, clients=[actor.id], aggregation_method="FedProx")
    return World(actor, participant, stranger, initial, ongoing, failed, participants_own, strangers)


async def listed(client: TestClient, account: Account, path: str, query: str = "") -> tuple[list[str], int]:
    """The ids a list answers with, in order, and its X-Total-Count."""
    response = await client.get(path + query, headers=account.headers)
    assert response.status == 200, (path, query, await response.text())
    body = await response.json()
    return [training["id"] for training in body], int(response.headers["X-Total-Count"])


async def test_lists_show_trainings_as_actor_or_also_as_participant(client: TestClient) -> None:
    world = await build_world(client)
    mine = {world.initial, world.ongoing, world.failed}
    ids, total = await listed(client, world.actor, "/api/trainings/")
    assert (set(ids), total, len(ids)) == (mine, 3, 3)
    ids, total = await listed(client, world.actor, "/api/users/trainings/")
    assert (set(ids), total, len(ids)) == (mine | {world.strangers}, 4, 4)
    ids, total = await listed(client, world.participant, "/api/trainings/")
    assert (ids, total) == ([world.participants_own], 1)
    ids, total = await listed(client, world.participant, "/api/users/trainings/")
    assert (set(ids), total) == ({world.ongoing, world.participants_own}, 2)
    ids, total = await listed(client, world.stranger, "/api/trainings/")
    assert (ids, total) == ([world.strangers], 1)
    newcomer = await register(client)
    for path in LISTS:
        response = await client.get(path, headers=newcomer.headers)
        assert response.status == 200
        assert await response.json() == []
        assert response.headers["X-Total-Count"] == "0"

    response = await client.get("/api/trainings/", headers=world.actor.headers)
    item = next(t for t in await response.json() if t["id"] == world.ongoing)
    assert item["participants"] == [world.participant.id]
    assert (item["state"], item["aggregation_method"], item["uncertainty_method"]) == ("O", "FedProx", "SWAG")
    assert item["actor"] == world.actor.id
    assert item["created_at"].endswith("Z") and item["last_update"].endswith("Z")


async def test_lists_filter_by_state_and_methods(client: TestClient) -> None:
    world = await build_world(client)
    cases = {
        "?state=I": {world.initial, world.strangers},
        "?state=O": {world.ongoing},
        "?state=E": {world.failed},
        "?state=C": set(),
        "?state=I&state=O": {world.initial, world.ongoing, world.strangers},
        "?state=O,E": {world.ongoing, world.failed},
        "?state=I,E&state=O": {world.initial, world.ongoing, world.failed, world.strangers},
        "?aggregation_method=FedProx": {world.ongoing, world.strangers},
        "?aggregation_method=FedAvg": {world.initial},
        "?uncertainty_method=MC_DROPOUT": {world.failed},
        "?uncertainty_method=NONE": {world.initial, world.strangers},
        "?uncertainty_method=ENSEMBLE": set(),
        "?state=I&aggregation_method=FedProx": {world.strangers},
        "?state=O,E&uncertainty_method=SWAG&aggregation_method=FedProx": {world.ongoing},
    }
    for query, expected in cases.items():
        ids, total = await listed(client, world.actor, "/api/users/trainings/", query)
        assert (set(ids), total) == (expected, len(expected)), query
        ids, total = await listed(client, world.actor, "/api/trainings/", query)
        as_actor = expected - {world.strangers}
        assert (set(ids), total) == (as_actor, len(as_actor)), query
    ids, total = await listed(
        client, world.participant, "/api/users/trainings/", "?uncertainty_method=ENSEMBLE"
    )
    assert (ids, total) == ([world.participants_own], 1)


async def test_lists_order_and_page(client: TestClient, database_url: str) -> None:
    actor, other = await register(client), await register(client)
    first = await create_training(client, actor)
    second = await create_training(client, actor)
    third = await create_training(client, other, clients=[actor.id])
    # Distinct, known times (the API stores milliseconds; quick creations may share one).
    for minutes, (training_id, touched) in enumerate([(first, 30), (second, 10), (third, 20)], start=1):
        await update_stored_training(
            database_url,
            training_id,
            created_at=BASE + timedelta(minutes=minutes),
            last_update=BASE + timedelta(minutes=touched),
        )
    orders = {
        "": [first, third, second],
        "?ordering=-last_update": [first, third, second],
        "?ordering=last_update": [second, third, first],
        "?ordering=created_at": [first, second, third],
        "?ordering=-created_at": [third, second, first],
    }
    for query, expected in orders.items():
        assert await listed(client, actor, "/api/users/trainings/", query) == (expected, 3), query
        as_actor = [training_id for training_id in expected if training_id != third]
        assert await listed(client, actor, "/api/trainings/", query) == (as_actor, 2), query
    pages = {
        "?limit=1": [first],
        "?limit=2": [first, third],
        "?limit=2&offset=2": [second],
        "?limit=1&offset=1&ordering=created_at": [second],
        "?offset=1": [third, second],
        "?offset=3": [],
        "?offset=100": [],
        "?limit=1000": [first, third, second],
        "?limit=1&state=I&ordering=last_update": [second],
    }
    for query, expected in pages.items():
        assert await listed(client, actor, "/api/users/trainings/", query) == (expected, 3), query


@pytest.mark.parametrize(
    "query",
    [
        "?foo=1",
        "?state[$ne]=I",
        "?state%5B%24ne%5D=I",
        "?state[]=I",
        "?$where=1",
        "?page=2",
        "?limit=1&limit=2",
        "?offset=0&offset=1",
        "?ordering=created_at&ordering=last_update",
        "?aggregation_method=FedAvg&aggregation_method=FedDC",
        "?limit=0",
        "?limit=1001",
        "?limit=-1",
        "?limit=abc",
        "?limit=1.5",
        "?limit=",
        "?offset=-1",
        "?offset=x",
        "?ordering=foo",
        "?ordering=id",
        "?ordering=-state",
        "?state=X",
        "?state=i",
        "?state=I,X",
        # An empty item is none of the codes the schema allows (it was silently dropped before).
        "?state=",
        "?state=I,",
        "?state=,O",
        "?state=I,,O",
        "?state=I&state=",
        "?aggregation_method=fedavg",
        "?uncertainty_method=none",
    ],
)
async def test_lists_reject_bad_queries(client: TestClient, query: str) -> None:
    actor = await register(client)
    await create_training(client, actor)
    for path in LISTS:
        response = await client.get(path + query, headers=actor.headers)
        assert response.status == 400, (path, query, await response.text())
        assert response.headers["Content-Type"].startswith("application/json")
        assert isinstance((await response.json())["detail"], str)


@pytest.mark.parametrize("path", LISTS)
async def test_list_items_are_exactly_the_public_training_objects(client: TestClient, path: str) -> None:
    """The list is encoded from projected documents in one pass; each item equals the GET of the training
    minus the detail fields (same keys, same values, same datetime format)."""
    world = await build_world(client)
    response = await client.get(path, headers=world.actor.headers)
    assert response.status == 200
    for item in await response.json():
        one = await client.get(f"/api/trainings/{item['id']}/", headers=world.actor.headers)
        if one.status != 200:
            continue  # a training the actor takes part in but does not run: visible through the list only
        detail = await one.json()
        assert {**item, "local_models_arrived": detail["local_models_arrived"],
                "local_models_expected": detail["local_models_expected"]} == detail


@pytest.mark.parametrize("path", LISTS)
async def test_an_unchanged_list_is_304_and_any_change_shows(client: TestClient, path: str) -> None:
    world = await build_world(client)
    first = await client.get(path, headers=world.actor.headers)
    tag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "private, no-cache"
    again = await client.get(path, headers={**world.actor.headers, "If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag
    assert again.headers["X-Total-Count"] == first.headers["X-Total-Count"] and await again.read() == b""
    # Another page or another user is another list.
    other = await client.get(path + "?limit=1", headers={**world.actor.headers, "If-None-Match": tag})
    assert other.status == 200
    theirs = await client.get(path, headers={**world.participant.headers, "If-None-Match": tag})
    assert theirs.status == 200
    # A change of one training's public fields changes the list's tag.
    patched = await client.patch(f"/api/trainings/{world.initial}/", headers=world.actor.headers,
                                 json={"metric_names": ["loss"]})
    assert patched.status == 200
    changed = await client.get(path, headers={**world.actor.headers, "If-None-Match": tag})
    assert changed.status == 200 and changed.headers["ETag"] != tag
    assert any(item["metric_names"] == ["loss"] for item in await changed.json())
    deleted = await client.delete(f"/api/trainings/{world.failed}/", headers=world.actor.headers)
    assert deleted.status == 200
    after_delete = await client.get(path, headers={**world.actor.headers, "If-None-Match": changed.headers["ETag"]})
    assert after_delete.status == 200


async def test_an_unchanged_training_is_304(client: TestClient) -> None:
    world = await build_world(client)
    first = await client.get(f"/api/trainings/{world.initial}/", headers=world.actor.headers)
    tag = first.headers["ETag"]
    again = await client.get(f"/api/trainings/{world.initial}/",
                             headers={**world.actor.headers, "If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag and await again.read() == b""
    weak = await client.get(f"/api/trainings/{world.initial}/",
                            headers={**world.actor.headers, "If-None-Match": f'"x", W/{tag}'})
    assert weak.status == 304
    await client.patch(f"/api/trainings/{world.initial}/", headers=world.actor.headers, json={"metric_names": ["f1"]})
    changed = await client.get(f"/api/trainings/{world.initial}/",
                               headers={**world.actor.headers, "If-None-Match": tag})
    assert changed.status == 200 and (await changed.json())["metric_names"] == ["f1"]
    # Not visible stays 403, whatever the validator.
    stranger = await client.get(f"/api/trainings/{world.initial}/",
                                headers={**world.stranger.headers, "If-None-Match": "*"})
    assert stranger.status == 403


async def test_the_fast_read_path_answers_what_the_schemas_would(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    """GET by id and the lists build their JSON from stored documents without pydantic; for trainings in
    every state (one mid-round, with a removed participant) that JSON equals the schemas' serialisation."""
    world = await build_world(client)
    extra = await register(client)
    await client.put(f"/api/trainings/{world.ongoing}/clients/", headers=world.actor.headers,
                     json={"clients": [extra.id]})
    async for raw in raw_db["trainings"].find({}):
        training = Training.model_validate(raw)
        arrived = await arrived_count(raw)
        by_schemas = json.loads(TrainingDetail.model_validate(
            {**TrainingPublic.model_validate(training).model_dump(),
             "local_models_arrived": arrived,
             "local_models_expected": len(expected_users(training)) if training.phase else len(training.participants),
             }).model_dump_json())
        assert json.loads(json_document(training_detail(raw, arrived)).body) == by_schemas
