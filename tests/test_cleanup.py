"""Clean-up: which files are still named, and effects applied once per process."""

import uuid
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect

from fltraining.documents import FILE_REFERENCES, Event, SetAsideEffect, Training
from fltraining.engine.effects import Effectors, LaterOutbox, apply_pending, event_document, remove_applied
from fltraining.storage.references import MODEL_FILE_HOLDERS, file_in_use

Raw = dict[str, Any]


async def name_in(document: Any, field: str, file_id: UUID) -> Any:
    """Store a bare document of this collection naming the file in this reference field; the collection."""
    head, _, rest = field.partition(".")
    value: Any = file_id if not rest else [{rest: [file_id]}]
    collection = document.get_pymongo_collection()
    await collection.insert_one({"_id": uuid.uuid4(), head: value}, bypass_document_validation=True)
    return collection


@pytest.mark.parametrize(("document", "field"), FILE_REFERENCES,
                         ids=[f"{document.__name__}.{field}" for document, field in FILE_REFERENCES])
async def test_a_file_is_in_use_while_any_reference_names_it(beanie_db: AsyncDatabase[Raw], document: Any,
                                                             field: str) -> None:
    file_id, other = uuid.uuid4(), uuid.uuid4()
    collection = await name_in(document, field, file_id)
    assert await file_in_use(file_id)
    assert not await file_in_use(other)
    await collection.delete_many({})
    assert not await file_in_use(file_id)


MODEL_FILE_REFERENCES = [(document, field) for document, field in FILE_REFERENCES if document in MODEL_FILE_HOLDERS]


@pytest.mark.parametrize(("document", "field"), MODEL_FILE_REFERENCES,
                         ids=[f"{document.__name__}.{field}" for document, field in MODEL_FILE_REFERENCES])
async def test_a_model_file_is_in_use_while_a_model_or_a_pending_effect_names_it(
        beanie_db: AsyncDatabase[Raw], document: Any, field: str) -> None:
    """The round engine asks only models and trainings' effects about a replaced model file (updates, SWAG
    statistics and data sets name files of their own): every field there still keeps the file."""
    file_id = uuid.uuid4()
    collection = await name_in(document, field, file_id)
    assert await file_in_use(file_id, model_file=True)
    await collection.delete_many({})
    assert not await file_in_use(file_id, model_file=True)


async def test_an_effect_applied_here_is_not_applied_again(beanie_db: AsyncDatabase[Raw]) -> None:
    """A training read before the `$pull` of effects this process applied still lists them: they are pulled, not
    applied again (a file drop is eleven reads). Another process, which did not apply them, applies them."""
    dropped: list[UUID] = []

    async def drop_file(file_id: UUID) -> bool:
        dropped.append(file_id)
        return True

    async def drop_files(file_ids: list[UUID]) -> None:
        """Nothing: no local files here."""

    file_id = uuid.uuid4()
    effect = {"id": "0001-00-aaaaaaaa", "kind": "drop_file", "file_id": file_id, "at": None}
    training = Training(model=uuid.uuid4(), actor=uuid.uuid4(), base_target_num_updates=1, target_num_updates=1,
                        effects=[effect])
    await training.insert()
    here = Effectors(drop_file, drop_files, LaterOutbox())
    await apply_pending(training, here, cleanup=True)
    await apply_pending(training, here, cleanup=True)  # the same snapshot once more
    assert dropped == [file_id]
    stored = await Training.get_pymongo_collection().find_one({"_id": training.id})
    assert stored is not None and stored["effects"] == []
    await apply_pending(training, Effectors(drop_file, drop_files, LaterOutbox()), cleanup=True)
    assert dropped == [file_id, file_id]


async def test_a_steps_events_are_stored_once_whoever_applies_them(beanie_db: AsyncDatabase[Raw]) -> None:
    """A step's events are written together; a second process applying the same snapshot, or a process that
    wrote some of them before it died, leaves each stored once."""

    async def drop_file(file_id: UUID) -> bool:
        return True

    async def drop_files(file_ids: list[UUID]) -> None:
        """Nothing: no local files here."""

    at = datetime.now(UTC).replace(microsecond=0)
    events = [{"id": f"0002-0{index}-event{index}", "kind": "event", "at": at, "type": kind, "round": 3, "user": None,
               "data": {"n": index}} for index, kind in enumerate(["aggregated", "round_started", "probe"])]
    training = Training(model=uuid.uuid4(), actor=uuid.uuid4(), base_target_num_updates=1, target_num_updates=1,
                        effects=events)
    await training.insert()
    stored = Event.get_pymongo_collection()
    await stored.insert_one(event_document(events[1], training))  # written by a process that died after it
    await apply_pending(training, Effectors(drop_file, drop_files, LaterOutbox()))
    await apply_pending(training, Effectors(drop_file, drop_files, LaterOutbox()))  # another process, same snapshot
    found = [raw async for raw in stored.find({"training": training.id}).sort("_id", 1)]
    assert [(raw["_id"], raw["type"], raw["data"]) for raw in found] == [
        (event["id"], event["type"], event["data"]) for event in events]
    assert await SetAsideEffect.get_pymongo_collection().count_documents({}) == 0


async def no_local_files(file_ids: list[UUID]) -> None:
    """Nothing: no local files here."""


async def _dropped(file_id: UUID) -> bool:
    return True


def drop_effect(index: int, file_id: UUID) -> dict[str, Any]:
    """A `drop_file` effect of a step at one fixed time."""
    return {"id": f"0003-0{index}-drop{index}", "kind": "drop_file", "file_id": file_id, "at": None}


async def test_removing_a_steps_effects_clears_the_marker_unless_a_step_added_more(
        beanie_db: AsyncDatabase[Raw]) -> None:
    """The reconciler finds trainings by `effects_pending`: it is cleared with the removal of the last effects,
    and stays set when a step pushed another effect after the snapshot that was applied."""
    first, second, later = (drop_effect(index, uuid.uuid4()) for index in range(3))
    training = Training(model=uuid.uuid4(), actor=uuid.uuid4(), base_target_num_updates=1, target_num_updates=1,
                        effects=[first, second], effects_pending=True)
    await training.insert()
    collection = Training.get_pymongo_collection()
    await collection.update_one({"_id": training.id}, {"$push": {"effects": later}})
    here = Effectors(_dropped, no_local_files, LaterOutbox())
    await remove_applied(training, [first["id"], second["id"]], here, alone=True)
    stored = await collection.find_one({"_id": training.id})
    assert stored is not None and [effect["id"] for effect in stored["effects"]] == [later["id"]]
    assert stored["effects_pending"] is True
    await remove_applied(Training.model_validate(stored), [later["id"]], here, alone=True)
    stored = await collection.find_one({"_id": training.id})
    assert stored is not None and stored["effects"] == [] and stored["effects_pending"] is False


async def test_effects_whose_application_failed_are_applied_and_removed_at_the_next_look(
        beanie_db: AsyncDatabase[Raw]) -> None:
    """A lost connection in the middle of a lane leaves its effects in the training; the same process applies
    all of them again at its next look (each is safe to repeat) and removes them, rather than skipping the
    ones it had applied and leaving them listed for ever."""
    dropped: list[UUID] = []
    failing = {uuid.uuid4()}

    async def drop_file(file_id: UUID) -> bool:
        if file_id in failing:
            failing.clear()
            raise AutoReconnect("connection lost")
        dropped.append(file_id)
        return True

    first, second = drop_effect(0, uuid.uuid4()), drop_effect(1, next(iter(failing)))
    training = Training(model=uuid.uuid4(), actor=uuid.uuid4(), base_target_num_updates=1, target_num_updates=1,
                        effects=[first, second], effects_pending=True)
    await training.insert()
    here = Effectors(drop_file, no_local_files, LaterOutbox())
    with pytest.raises(AutoReconnect):
        await apply_pending(training, here, cleanup=True)
    assert dropped == [first["file_id"]]
    await apply_pending(training, here, cleanup=True)
    assert dropped == [first["file_id"], first["file_id"], second["file_id"]]
    stored = await Training.get_pymongo_collection().find_one({"_id": training.id})
    assert stored is not None and stored["effects"] == [] and stored["effects_pending"] is False
