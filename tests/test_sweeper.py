"""Leftovers of interrupted writes (a crash between two inserts) are settled by the sweeper."""

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from aiohttp.test_utils import TestClient

from fltraining.clock import utcnow
from fltraining.documents import Model, Training
from routes.keys import models_key
from tests.helpers import (
    create_training,
    register,
    small_model,
    staging_leftovers,
    stored_blobs,
    upload_model,
)


async def anything() -> Any:
    """An async iterator of one chunk: a model file."""
    yield small_model()


async def test_a_clone_whose_training_never_arrived_is_removed(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    await create_training(client, owner, model_id)
    service = client.server.app[models_key]
    original = await service.get(UUID(model_id))
    # What a crash after the clone's insert and before its training's insert leaves behind.
    orphan = await service.clone(original, training_id=uuid4())
    later = utcnow() + timedelta(seconds=1)
    assert await service.sweep(older_than=utcnow() - timedelta(minutes=5)) == 0  # still within grace
    assert await service.sweep(older_than=later) == 1
    assert await Model.find({"_id": orphan.id}).count() == 0
    # The original and its file are untouched: the training still downloads its bytes.
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 200 and await response.read() == small_model()


async def test_a_marked_clone_whose_training_exists_becomes_an_ordinary_model(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    first = await create_training(client, owner, model_id)
    second = await create_training(client, owner, model_id)
    training = await Training.find_one({"_id": UUID(second)})
    assert training is not None and str(training.model) != model_id
    clone = await Model.find_one({"_id": training.model})
    assert clone is not None and clone.pending_training == training.id  # the creation wrote no third time
    service = client.server.app[models_key]
    assert await service.sweep(older_than=utcnow() + timedelta(seconds=1)) == 0
    kept = await Model.find_one({"_id": clone.id})
    assert kept is not None and kept.pending_training is None
    for training_id in (first, second):
        assert (await client.get(f"/api/trainings/{training_id}/", headers=owner.headers)).status == 200
    response = await client.get(f"/api/models/{clone.id}/", headers=owner.headers)
    assert response.status == 200 and await response.read() == small_model()


async def test_a_clone_outlives_its_training_deleted_before_any_sweep(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    await create_training(client, owner, model_id)
    second = await create_training(client, owner, model_id)
    training = await Training.find_one({"_id": UUID(second)})
    assert training is not None
    assert (await client.delete(f"/api/trainings/{second}/", headers=owner.headers)).status == 200
    # The model stays when its training is deleted; the sweeper must not take it for a crash's leftover.
    service = client.server.app[models_key]
    assert await service.sweep(older_than=utcnow() + timedelta(seconds=1)) == 0
    response = await client.get(f"/api/models/{training.model}/metadata/", headers=owner.headers)
    assert response.status == 200


async def test_the_sweeper_settles_more_clones_than_one_batch(client: TestClient, monkeypatch: Any) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    await create_training(client, owner, model_id)
    monkeypatch.setattr("fltraining.services.models.SWEEP_BATCH", 2)
    service = client.server.app[models_key]
    original = await service.get(UUID(model_id))
    kept = [await create_training(client, owner, model_id) for _ in range(3)]
    orphans = [(await service.clone(original, training_id=uuid4())).id for _ in range(2)]
    assert await service.sweep(older_than=utcnow() + timedelta(seconds=1)) == 2
    assert await Model.find({"_id": {"$in": orphans}}).count() == 0
    assert await Model.find({"pending_training": {"$ne": None}}).count() == 0
    for training_id in kept:
        assert (await client.get(f"/api/trainings/{training_id}/", headers=owner.headers)).status == 200


async def test_a_file_without_a_model_is_removed(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    service = client.server.app[models_key]
    stored = await service.store_file(anything())  # an upload interrupted before its model was written
    assert await service.sweep(older_than=utcnow() - timedelta(minutes=5)) == 0  # still within grace
    assert stored.file_id in await stored_blobs(client)
    assert await service.sweep(older_than=utcnow() + timedelta(seconds=1)) == 1
    assert stored.file_id not in await stored_blobs(client)
    assert (await client.get(f"/api/models/{model_id}/", headers=owner.headers)).status == 200


async def test_a_staging_file_of_an_interrupted_upload_is_removed(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    service = client.server.app[models_key]
    # What a process killed while an upload streamed in leaves: a partial staging file, no blob.
    staged = await service.files.stage(anything(), max_bytes=100)
    assert staging_leftovers(client) == [staged.path.name]
    assert await service.sweep(older_than=utcnow() - timedelta(minutes=5)) == 0  # may still be in flight
    assert await service.sweep(older_than=utcnow() + timedelta(seconds=1)) == 1
    assert staging_leftovers(client) == []
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 200 and await response.read() == small_model()
