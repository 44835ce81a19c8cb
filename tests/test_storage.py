"""Stored documents, the collection validator, the daisy-chain hook, indexes and the mongoeco fixes."""

import contextlib
import copy
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pytest
from aiohttp.test_utils import TestClient
from bson import Binary, Int64, ObjectId
from bson.dbref import DBRef
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from fltraining.documents import Training
from fltraining.storage import mongoeco_fixes
from fltraining.storage.database import database_name
from tests.helpers import create_training, register, upload_model

Raw = dict[str, Any]


def db_name(url: str) -> str:
    """The database a test URL names."""
    return database_name(url, "fltraining")


@pytest.fixture
async def plain_db(database_url: str) -> AsyncIterator[AsyncDatabase[Raw]]:
    """The test database through PyMongo with default codecs: UUIDs come back as raw Binary."""
    mongo: AsyncMongoClient[Raw] = AsyncMongoClient(database_url, tz_aware=True)
    yield mongo[db_name(database_url)]
    await mongo.close()


def new_training(base: int = 42, period: int | None = 5, **fields: Any) -> Training:
    """An unsaved training whose options carry the given daisy-chain period."""
    options = {} if period is None else {"daisy_chain_period": period}
    return Training(
        model=uuid.uuid4(),
        actor=uuid.uuid4(),
        base_target_num_updates=base,
        target_num_updates=base,
        options=options,
        **fields,
    )


async def stored_target(training: Training) -> int:
    """The target_num_updates stored for a training, read raw."""
    document = await Training.get_pymongo_collection().find_one({"_id": training.id})
    assert document is not None
    return int(document["target_num_updates"])


# --- the stored training document -----------------------------------------------------------

OPTIONS = {
    "daisy_chain_period": 5,
    "uncertainty": {"N": 3, "softmax": True},
    "lr": 0.01,
    "layers": [64, {"kind": "dense"}],
    "note": None,
    "nested": {"deep": {"er": [1, 2]}},
}


async def test_stored_training_document(client: TestClient, plain_db: AsyncDatabase[Raw]) -> None:
    actor = await register(client)
    participant = await register(client)
    model_id = await upload_model(client, actor)
    training_id = await create_training(
        client,
        actor,
        model_id,
        clients=[participant.id],
        options=OPTIONS,
        target_num_updates=42,
        metric_names=["accuracy"],
    )
    document = await plain_db["trainings"].find_one({})
    assert document is not None

    def is_uuid(value: Any, expected: str) -> bool:
        return isinstance(value, Binary) and value.subtype == 4 and value.as_uuid() == uuid.UUID(expected)

    assert is_uuid(document["_id"], training_id)
    assert is_uuid(document["model"], model_id)
    assert is_uuid(document["actor"], actor.id)
    assert len(document["participants"]) == 1 and is_uuid(document["participants"][0], participant.id)
    for value in (document["model"], document["actor"], *document["participants"]):
        assert not isinstance(value, DBRef)
    for field, code in (("state", "I"), ("aggregation_method", "FedAvg"), ("uncertainty_method", "NONE")):
        assert type(document[field]) is str and document[field] == code
    assert document["options"] == OPTIONS
    assert document["target_num_updates"] == 210
    assert document["metric_names"] == ["accuracy"]
    assert document["locked"] is False
    assert document["state_detail"] is None
    assert isinstance(document["created_at"], datetime) and isinstance(document["last_update"], datetime)
    # References join on plain fields: $lookup from trainings to models and users works.
    cursor = await plain_db["trainings"].aggregate(
        [
            {"$lookup": {"from": "models", "localField": "model", "foreignField": "_id", "as": "model_doc"}},
            {"$lookup": {"from": "users", "localField": "actor", "foreignField": "_id", "as": "actor_doc"}},
        ]
    )
    joined = await cursor.to_list()
    assert joined[0]["model_doc"][0]["name"] == "model"
    assert joined[0]["actor_doc"][0]["username"] == actor.username


# --- the $jsonSchema validator --------------------------------------------------------------


@pytest.fixture
async def enforcing_backend(raw_db: AsyncDatabase[Raw], backend_name: str) -> None:
    """Skip, on this backend only, when it does not enforce `$jsonSchema` validators at all."""
    await raw_db.create_collection("validator_probe", validator={"$jsonSchema": {"required": ["x"]}})
    try:
        await raw_db["validator_probe"].insert_one({"y": 1})
    except WriteError:
        return
    finally:
        await raw_db.drop_collection("validator_probe")
    reason = f"{backend_name} does not enforce $jsonSchema validators"
    print(reason)
    pytest.skip(reason)


@pytest.fixture
async def valid_training_document(beanie_db: AsyncDatabase[Raw]) -> Raw:
    """A raw training document that the validator accepts, as a template."""
    training = new_training()
    await training.insert()
    document = await beanie_db["trainings"].find_one({"_id": training.id})
    assert document is not None
    return document


def fresh(document: Raw) -> Raw:
    """A copy with a new id and a new model, so unique indexes do not interfere."""
    clone = copy.deepcopy(document)
    clone["_id"] = uuid.uuid4()
    clone["model"] = uuid.uuid4()
    return clone


def without(field: str) -> Callable[[Raw], None]:
    """A mutation removing a field."""
    return lambda document: document.pop(field)


def setting(field: str, value: Any) -> Callable[[Raw], None]:
    """A mutation setting a field."""
    return lambda document: document.__setitem__(field, value)


@pytest.mark.parametrize(
    "mutate",
    [
        setting("state", "X"),
        setting("state", "TrainingState.INITIAL"),
        setting("aggregation_method", "fedavg"),
        setting("uncertainty_method", None),
        setting("target_num_updates", 0),
        setting("target_num_updates", "42"),
        setting("model", "not a uuid"),
        setting("actor", DBRef("users", uuid.uuid4())),
        setting("participants", ["someone"]),
        setting("options", "not an object"),
        setting("options", {"daisy_chain_period": "5"}),
        setting("options", {"uncertainty": {"N": 0}}),
        setting("locked", "no"),
        setting("last_update", "2026-11-27T10:00:00Z"),
        without("state"),
        without("actor"),
        without("target_num_updates"),
        without("options"),
    ],
    ids=[
        "state X",
        "state python repr",
        "aggregation lower-case",
        "uncertainty null",
        "target 0",
        "target string",
        "model string",
        "actor dbref",
        "participant string",
        "options string",
        "period string",
        "uncertainty N 0",
        "locked string",
        "last_update string",
        "no state",
        "no actor",
        "no target",
        "no options",
    ],
)
async def test_validator_rejects_a_broken_raw_training(
    enforcing_backend: None,
    beanie_db: AsyncDatabase[Raw],
    valid_training_document: Raw,
    mutate: Callable[[Raw], None],
) -> None:
    trainings = beanie_db["trainings"]
    await trainings.insert_one(fresh(valid_training_document))  # the template itself is accepted
    broken = fresh(valid_training_document)
    mutate(broken)
    with pytest.raises(WriteError) as raised:
        await trainings.insert_one(broken)
    assert not isinstance(raised.value, DuplicateKeyError)
    assert await trainings.count_documents({"_id": broken["_id"]}) == 0


@pytest.mark.parametrize(("base", "period", "target", "accepted"), [
    (3, 5, 15, True), (3, None, 3, True), (3, 0, 3, True), (3, 5, 3, False), (3, None, 15, False), (3, 0, 0, False),
], ids=["period 5 applied", "no period", "period 0", "period 5 skipped", "applied without a period", "target 0"])
async def test_a_direct_insert_cannot_skip_the_daisy_chain_rule(
    enforcing_backend: None, beanie_db: AsyncDatabase[Raw], valid_training_document: Raw,
    base: int, period: int | None, target: int, accepted: bool,
) -> None:
    """The rule lives in the Beanie insert hook; the database's validator holds any other writer to it too:
    a raw insert, a raw bulk insert and a raw update."""
    trainings = beanie_db["trainings"]
    document = fresh(valid_training_document)
    document.update(base_target_num_updates=base, target_num_updates=target,
                    options={} if period is None else {"daisy_chain_period": period})
    if accepted:
        await trainings.insert_one(document)
        return
    with pytest.raises(WriteError):
        await trainings.insert_one(document)
    with pytest.raises(BulkWriteError):
        await trainings.insert_many([fresh(valid_training_document), document], ordered=True)
    with pytest.raises(WriteError):
        await trainings.update_one({"_id": valid_training_document["_id"]},
                                   {"$set": {"target_num_updates": valid_training_document["target_num_updates"] + 1}})
    assert await trainings.count_documents({"_id": document["_id"]}) == 0


async def test_validator_rejects_a_broken_raw_update(
    enforcing_backend: None, beanie_db: AsyncDatabase[Raw], valid_training_document: Raw
) -> None:
    trainings = beanie_db["trainings"]
    with pytest.raises(WriteError):
        await trainings.update_one({"_id": valid_training_document["_id"]}, {"$set": {"state": "X"}})
    stored = await trainings.find_one({"_id": valid_training_document["_id"]})
    assert stored is not None and stored["state"] == "I"


# --- the daisy-chain hook -------------------------------------------------------------------


@pytest.mark.parametrize(("base", "period", "stored"), [(42, 5, 210), (42, 0, 42), (42, None, 42), (7, 1, 7)])
async def test_insert_applies_daisy_chain(
    beanie_db: AsyncDatabase[Raw], base: int, period: int | None, stored: int
) -> None:
    training = new_training(base, period)
    await training.insert()
    assert await stored_target(training) == stored
    assert training.target_num_updates == stored


async def test_save_of_a_new_training_applies_daisy_chain(beanie_db: AsyncDatabase[Raw]) -> None:
    training = new_training(42, 5)
    await training.save()
    assert await stored_target(training) == 210


async def test_insert_many_applies_daisy_chain(beanie_db: AsyncDatabase[Raw]) -> None:
    trainings = [new_training(42, 5), new_training(10, 3), new_training(8, None)]
    await Training.insert_many(trainings)
    assert [await stored_target(training) for training in trainings] == [210, 30, 8]


async def test_retried_insert_is_rejected_and_not_doubled(beanie_db: AsyncDatabase[Raw]) -> None:
    training = new_training(42, 5)
    await training.insert()
    with pytest.raises(DuplicateKeyError):
        await training.insert()
    assert await stored_target(training) == 210
    assert training.target_num_updates == 210
    assert await Training.find({"_id": training.id}).count() == 1


async def test_saving_an_existing_training_does_not_multiply_again(beanie_db: AsyncDatabase[Raw]) -> None:
    training = new_training(42, 5)
    await training.insert()
    training.metric_names = ["loss"]
    await training.save()
    loaded = await Training.get(training.id)
    assert loaded is not None
    await loaded.save()
    await loaded.replace()
    assert await stored_target(training) == 210
    reloaded = await Training.get(training.id)
    assert reloaded is not None and reloaded.target_num_updates == 210 and reloaded.metric_names == ["loss"]


async def test_changing_the_period_and_saving_recomputes_from_the_requested_target(
    beanie_db: AsyncDatabase[Raw],
) -> None:
    training = new_training(42, 5)
    await training.insert()
    training.options = {"daisy_chain_period": 2}
    await training.save()
    assert await stored_target(training) == 84


# --- unique indexes -------------------------------------------------------------------------


async def test_one_training_per_model(beanie_db: AsyncDatabase[Raw], valid_training_document: Raw) -> None:
    trainings = beanie_db["trainings"]
    same_model = fresh(valid_training_document)
    same_model["model"] = valid_training_document["model"]
    with pytest.raises(DuplicateKeyError):
        await trainings.insert_one(same_model)
    await trainings.insert_one(fresh(valid_training_document))  # another model is fine
    assert await trainings.count_documents({"model": valid_training_document["model"]}) == 1


async def test_usernames_are_unique(client: TestClient, raw_db: AsyncDatabase[Raw]) -> None:
    await register(client, "unique-name")
    users = raw_db["users"]
    original = await users.find_one({"username": "unique-name"})
    assert original is not None
    duplicate = {**original, "_id": uuid.uuid4(), "token_hash": "f" * 64}
    with pytest.raises(DuplicateKeyError):
        await users.insert_one(duplicate)
    await users.insert_one({**duplicate, "username": "other-name"})
    assert await users.count_documents({"username": "unique-name"}) == 1


# --- the mongoeco 4.11.0 fixes --------------------------------------------------------------


def test_apply_refuses_another_mongoeco_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from mongoeco import _version
    from mongoeco.engines import memory, sqlite
    from mongoeco.wire import bson_bridge, protocol

    monkeypatch.setattr(mongoeco_fixes, "_applied", False)
    monkeypatch.setattr(_version, "__version__", "4.12.0")
    patched = (
        memory.MemoryEngine._ensure_unique_indexes,
        sqlite.SQLiteEngine._validate_document_against_unique_indexes,
        protocol.encode_wire_value,
        bson_bridge.encode_wire_value,
    )
    with pytest.raises(mongoeco_fixes.UnsupportedMongoecoVersion, match="4.12.0"):
        mongoeco_fixes.apply()
    assert mongoeco_fixes._applied is False
    assert patched == (
        memory.MemoryEngine._ensure_unique_indexes,
        sqlite.SQLiteEngine._validate_document_against_unique_indexes,
        protocol.encode_wire_value,
        bson_bridge.encode_wire_value,
    )


@pytest.fixture(scope="module")
def fixed_mongoeco() -> None:
    """Apply the fixes in this process too, for the in-process engine tests."""
    mongoeco_fixes.apply()


def test_apply_is_idempotent(fixed_mongoeco: None) -> None:
    from mongoeco.engines import memory
    from mongoeco.wire import protocol

    before = (memory.MemoryEngine._ensure_unique_indexes, protocol.encode_wire_value)
    mongoeco_fixes.apply()
    assert (memory.MemoryEngine._ensure_unique_indexes, protocol.encode_wire_value) == before


ENGINES = ["memory", "sqlite"]


@pytest.fixture
async def engine_collection(
    request: pytest.FixtureRequest, fixed_mongoeco: None, tmp_path: Path
) -> AsyncIterator[Any]:
    """A collection on an in-process mongoeco engine (`request.param`: memory or sqlite)."""
    import mongoeco
    from mongoeco.engines.memory import MemoryEngine
    from mongoeco.engines.sqlite import SQLiteEngine

    engine = MemoryEngine() if request.param == "memory" else SQLiteEngine(str(tmp_path / "engine.sqlite3"))
    client = mongoeco.AsyncMongoClient(engine)
    async with client:
        yield client["db"]["things"]


SAME_UUID = uuid.uuid4()
SAME_OBJECT_ID = ObjectId()
DUPLICATE_IDS = [
    (SAME_UUID, SAME_UUID),
    ("name", "name"),
    (SAME_OBJECT_ID, SAME_OBJECT_ID),
    (1, 1),
    (1, 1.0),
    (1, Int64(1)),
    (1.0, Int64(1)),
    (Int64(1), 1),
]
DUPLICATE_IDS_NAMES = [
    "uuid",
    "string",
    "objectid",
    "int",
    "int-double",
    "int-int64",
    "double-int64",
    "int64-int",
]


@pytest.mark.parametrize("engine_collection", ENGINES, indirect=True)
@pytest.mark.parametrize(("first", "second"), DUPLICATE_IDS, ids=DUPLICATE_IDS_NAMES)
async def test_duplicate_id_is_rejected_in_process(engine_collection: Any, first: Any, second: Any) -> None:
    await engine_collection.insert_one({"_id": uuid.uuid4()})  # not alone in the collection
    await engine_collection.insert_one({"_id": first, "n": 1})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"_id": second, "n": 2})
    assert await engine_collection.count_documents({}) == 2
    assert (await engine_collection.find_one({"_id": first}))["n"] == 1


@pytest.mark.parametrize(("first", "second"), DUPLICATE_IDS, ids=DUPLICATE_IDS_NAMES)
async def test_duplicate_id_is_rejected_over_the_wire(
    raw_db: AsyncDatabase[Raw], first: Any, second: Any
) -> None:
    collection = raw_db["things"]
    await collection.insert_one({"_id": uuid.uuid4()})
    await collection.insert_one({"_id": first, "n": 1})
    with pytest.raises(DuplicateKeyError):
        await collection.insert_one({"_id": second, "n": 2})
    assert await collection.count_documents({}) == 2


@pytest.fixture
def scanned_documents(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the stored documents either engine decodes for a full-collection scan."""
    from mongoeco.engines.memory import MemoryEngine
    from mongoeco.engines.sqlite import SQLiteEngine

    counter = [0]
    load_documents = SQLiteEngine._load_documents
    borrow = MemoryEngine._borrow_storage_document

    def counting_load(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for row in load_documents(self, *args, **kwargs):
            counter[0] += 1
            yield row

    def counting_borrow(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return borrow(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteEngine, "_load_documents", counting_load)
    monkeypatch.setattr(MemoryEngine, "_borrow_storage_document", counting_borrow)
    yield counter


STORED = 60


@pytest.mark.parametrize("engine_collection", ENGINES, indirect=True)
@pytest.mark.parametrize(
    "make_id", [uuid.uuid4, ObjectId, lambda: uuid.uuid4().hex], ids=["uuid", "objectid", "string"]
)
async def test_insert_does_not_scan_the_collection(
    engine_collection: Any, scanned_documents: list[int], make_id: Callable[[], Any]
) -> None:
    await engine_collection.create_index("name", unique=True)
    await engine_collection.insert_many([{"_id": make_id(), "name": f"n{i}"} for i in range(STORED)])
    scanned_documents[0] = 0
    await engine_collection.insert_one({"_id": make_id(), "name": "new"})
    assert scanned_documents[0] == 0
    # A numeric _id still needs the scan (1, 1.0 and Int64(1) are one key): the counter sees it.
    await engine_collection.insert_one({"_id": 7, "name": "numeric"})
    assert scanned_documents[0] >= STORED


def test_wire_encoder_handles_nested_dbrefs_with_uuid_ids(fixed_mongoeco: None) -> None:
    from mongoeco.wire import protocol

    target = uuid.uuid4()
    document = {
        "_id": 1,
        "ref": DBRef("models", target),
        "refs": [{"deep": DBRef("users", target, extra=target)}],
    }
    decoded = bson.decode(
        bson.encode(protocol.encode_wire_value(document)), bson.CodecOptions(uuid_representation=4)
    )
    assert decoded["ref"] == DBRef("models", target)
    assert decoded["refs"][0]["deep"].id == target


async def test_dbref_with_uuid_id_round_trips_over_the_wire(raw_db: AsyncDatabase[Raw]) -> None:
    collection = raw_db["references"]
    document_id, target = uuid.uuid4(), uuid.uuid4()
    document = {
        "_id": document_id,
        "model": DBRef("models", target),
        "many": [DBRef("users", uuid.uuid4(), "other")],
    }
    await collection.insert_one(document)
    read = await collection.find_one({"_id": document_id})
    assert read == document
    assert await collection.find({}).to_list() == [document]


def test_apply_refuses_another_mongoeco_version_for_unique_index_fix_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from mongoeco import _version
    from mongoeco.engines.sqlite import SQLiteEngine

    names = [
        "_insert_document_sync",
        "_insert_documents_sync",
        "_invalidate_collection_features_cache",
        "_unique_index_conflict_via_scalar_entries",
    ]
    monkeypatch.setattr(mongoeco_fixes, "_applied", False)
    monkeypatch.setattr(_version, "__version__", "4.12.0")
    before = [getattr(SQLiteEngine, name) for name in names]
    with pytest.raises(mongoeco_fixes.UnsupportedMongoecoVersion):
        mongoeco_fixes.apply()
    assert [getattr(SQLiteEngine, name) for name in names] == before


SAME_OWNER = uuid.uuid4()
# (index keys, a stored document's key fields made from i, documents with the same key as i=3)
UNIQUE_KEYS = [
    ([("name", 1)], lambda i: {"name": f"n{i}"}, [{"name": "n3"}]),
    ([("model", 1)], lambda i: {"model": uuid.UUID(int=i)}, [{"model": uuid.UUID(int=3)}]),
    ([("number", 1)], lambda i: {"number": i}, [{"number": 3}, {"number": 3.0}, {"number": Int64(3)}]),
    (
        [("files_id", 1), ("n", 1)],
        lambda i: {"files_id": SAME_OWNER, "n": i},
        [{"files_id": SAME_OWNER, "n": 3}, {"files_id": SAME_OWNER, "n": 3.0}, {"files_id": SAME_OWNER, "n": Int64(3)}],
    ),
    (
        [("owner", 1), ("label", 1)],
        lambda i: {"owner": SAME_OBJECT_ID, "label": f"l{i}"},
        [{"owner": SAME_OBJECT_ID, "label": "l3"}],
    ),
]
UNIQUE_KEYS_NAMES = ["string", "uuid", "number", "compound-uuid-number", "compound-objectid-string"]


@pytest.mark.parametrize("engine_collection", ENGINES, indirect=True)
@pytest.mark.parametrize(("keys", "key_of", "duplicates"), UNIQUE_KEYS, ids=UNIQUE_KEYS_NAMES)
async def test_unique_secondary_index_rejects_duplicates(
    engine_collection: Any, keys: list[tuple[str, int]], key_of: Callable[[int], Raw], duplicates: list[Raw]
) -> None:
    await engine_collection.create_index(keys, unique=True)
    await engine_collection.insert_many([{**key_of(i), "i": i} for i in range(STORED)])
    for i in range(STORED, STORED + 20):  # one at a time too
        await engine_collection.insert_one({**key_of(i), "i": i})
    for duplicate in duplicates:
        with pytest.raises(DuplicateKeyError):
            await engine_collection.insert_one({**duplicate, "i": -1})
    # After an update, the old key is free and the new one taken.
    await engine_collection.update_one(key_of(3), {"$set": key_of(1000)})
    await engine_collection.insert_one({**key_of(3), "i": 3})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({**key_of(1000), "i": -1})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.update_one(key_of(4), {"$set": key_of(5)})
    # After a delete, the key is free once.
    await engine_collection.delete_one(key_of(3))
    await engine_collection.insert_one({**key_of(3), "i": 3})
    for duplicate in duplicates:
        with pytest.raises(DuplicateKeyError):
            await engine_collection.insert_one({**duplicate, "i": -1})
    assert await engine_collection.count_documents({"i": -1}) == 0
    assert await engine_collection.count_documents({}) == STORED + 21


@pytest.mark.parametrize("engine_collection", ENGINES, indirect=True)
async def test_unique_multikey_index_rejects_a_duplicate_element(engine_collection: Any) -> None:
    await engine_collection.create_index("tags", unique=True)
    await engine_collection.create_index([("owner", 1), ("n", 1)], unique=True)
    await engine_collection.insert_many([{"tags": f"t{i}", "owner": SAME_OWNER, "n": i} for i in range(STORED)])
    await engine_collection.insert_one({"tags": "scalar", "owner": SAME_OWNER, "n": -1})  # facts cached as "no array"
    await engine_collection.insert_one({"tags": ["a", "b"], "owner": SAME_OWNER, "n": [100, 101]})
    for duplicate in [
        {"tags": "b"},
        {"tags": ["c", "a"]},
        {"tags": "t5"},
        {"owner": SAME_OWNER, "n": 101},
        {"owner": SAME_OWNER, "n": [102, 100]},
    ]:
        with pytest.raises(DuplicateKeyError):
            await engine_collection.insert_one(duplicate)
    # An array arriving by update is seen by the next insert too.
    await engine_collection.update_one({"tags": "t7"}, {"$set": {"tags": ["t7", "u7"]}})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"tags": "u7"})
    # And by a batch insert, within that batch.
    with pytest.raises(BulkWriteError):
        await engine_collection.insert_many([{"tags": ["v1", "v2"]}, {"tags": "v2"}])
    assert await engine_collection.count_documents({"tags": "v2"}) == 1


@pytest.mark.parametrize("engine_collection", ENGINES, indirect=True)
async def test_unique_collation_index_rejects_duplicates(engine_collection: Any) -> None:
    await engine_collection.create_index("name", unique=True, collation={"locale": "en", "strength": 2})
    await engine_collection.insert_many([{"name": f"Name{i}"} for i in range(STORED)])
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"name": "NAME3"})
    await engine_collection.insert_one({"name": "Name3x"})


@pytest.fixture
def array_scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the full-collection json_type scans for "is there an array at this field"."""
    from mongoeco.engines.sqlite import SQLiteEngine

    counter = [0]
    top_level = SQLiteEngine._field_is_top_level_array_in_collection

    def counting(self: Any, db_name: str, coll_name: str, field: str) -> bool:
        if (db_name, coll_name, f"top_level_array:{field}") not in self._collection_features_cache:
            counter[0] += 1
        return top_level(self, db_name, coll_name, field)

    monkeypatch.setattr(SQLiteEngine, "_field_is_top_level_array_in_collection", counting)
    yield counter


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("keys", "key_of", "duplicates"), UNIQUE_KEYS, ids=UNIQUE_KEYS_NAMES)
async def test_unique_index_check_does_not_scan_the_collection(
    engine_collection: Any,
    scanned_documents: list[int],
    array_scans: list[int],
    keys: list[tuple[str, int]],
    key_of: Callable[[int], Raw],
    duplicates: list[Raw],
) -> None:
    await engine_collection.create_index(keys, unique=True)
    await engine_collection.insert_many([{**key_of(i), "i": i} for i in range(STORED)])
    await engine_collection.insert_one({**key_of(STORED), "i": STORED})
    scanned_documents[0] = array_scans[0] = 0
    for i in range(STORED + 1, STORED + 11):
        await engine_collection.insert_one({**key_of(i), "i": i})
    await engine_collection.insert_many([{**key_of(i), "i": i} for i in range(STORED + 11, STORED + 21)])
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one(duplicates[-1])
    assert (scanned_documents[0], array_scans[0]) == (0, 0)
    # A write that puts an array under the key drops the fact: the counter sees the next check scan again.
    await engine_collection.update_one(key_of(1), {"$set": {keys[0][0]: ["an", "array"]}})
    await engine_collection.insert_one({**key_of(STORED + 21), "i": STORED + 21})
    assert array_scans[0] >= 1


async def test_gridfs_chunk_index_rejects_a_duplicate_chunk_over_the_wire(raw_db: AsyncDatabase[Raw], tmp_path: Path) -> None:
    from fltraining.storage.blob_gridfs import BUCKET, CHUNK_BYTES, GridFSBlobStore
    from fltraining.storage.blobs import Staging

    async def content() -> AsyncIterator[bytes]:
        yield bytes(3 * CHUNK_BYTES)

    files = GridFSBlobStore(raw_db, Staging(tmp_path))
    stored = [await files.put(content(), 10 * CHUNK_BYTES) for _ in range(3)]
    chunks = raw_db[f"{BUCKET}.chunks"]
    assert await chunks.count_documents({}) == 9
    with pytest.raises(DuplicateKeyError):
        await chunks.insert_one({"files_id": stored[1].file_id, "n": 2, "data": b"x"})
    await chunks.insert_one({"files_id": stored[1].file_id, "n": 3, "data": b"x"})
    assert await chunks.count_documents({"files_id": stored[1].file_id}) == 4


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_deletes_keep_the_facts_they_leave_true(engine_collection: Any, array_scans: list[int]) -> None:
    await engine_collection.create_index("k", unique=True)
    await engine_collection.insert_many([{"k": i} for i in range(STORED)])
    await engine_collection.insert_one({"k": STORED})
    array_scans[0] = 0
    await engine_collection.delete_one({"k": 3})
    await engine_collection.delete_many({"k": {"$in": [4, 5]}})
    await engine_collection.insert_one({"k": STORED + 1})
    assert array_scans[0] == 0  # before the fourth correction, every delete cost a full scan here
    # The unique index still answers right: deleted keys are free, others are not.
    await engine_collection.insert_one({"k": 3})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"k": 6})
    # An array arriving after the deletes is seen by the next check.
    await engine_collection.insert_one({"k": [900, 901]})
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"k": 901})
    assert await engine_collection.count_documents({}) == STORED + 1


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_updates_do_not_rebuild_every_uuid_and_datetime(
    engine_collection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mongoeco deep-copies a document on every update; UUIDs and datetimes are immutable, so a copy is the value
    itself (before: each was rebuilt through `__reduce_ex__`, half the CPU of an update of a training with 1,000
    participants). The values stored are unchanged."""
    users = [uuid.uuid4() for _ in range(1000)]
    moments = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(100)]
    await engine_collection.insert_one({"_id": "t", "participants": users, "at": moments, "version": 1})
    rebuilt = [0]
    reconstruct = copy._reconstruct  # type: ignore[attr-defined]

    def counting(*args: Any, **kwargs: Any) -> Any:
        rebuilt[0] += 1
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(copy, "_reconstruct", counting)
    await engine_collection.update_one({"_id": "t"}, {"$inc": {"version": 1}})
    assert rebuilt[0] == 0
    stored = await engine_collection.find_one({"_id": "t"})
    assert (stored["participants"], stored["version"]) == (users, 2)
    assert [moment.replace(tzinfo=UTC) for moment in stored["at"]] == moments
    assert copy.deepcopy(users[0]) is users[0]


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_reads_fixing_the_id_seek_its_row(engine_collection: Any) -> None:
    """A filter fixing `_id` to a UUID, ObjectId or string reads that one row by its key (mongoeco matched `_id`
    with json_extract on every document: each count of one training parsed every stored training, each settling
    of a notification every stored record); every answer is as before, for other ids too."""
    ids: list[Any] = [uuid.uuid4() for _ in range(20)] + [ObjectId() for _ in range(5)] + [
        "name", "1796681312936-02-237b5e14", "(<class 'str'>, 'name')", "", 7, 7.5, Int64(8)]
    await engine_collection.create_index("n")
    await engine_collection.insert_many([{"_id": value, "n": k, "tags": [k, k + 1]} for k, value in enumerate(ids)])
    statements: list[str] = []
    connection = engine_collection._engine._connection
    connection.set_trace_callback(statements.append)
    try:
        for k, value in enumerate(ids):
            statements.clear()
            assert await engine_collection.count_documents({"_id": value, "n": k}) == 1
            seeks = any("documents.storage_key = '(" in sql for sql in statements if sql.startswith("SELECT COUNT(*)"))
            assert seeks == isinstance(value, uuid.UUID | ObjectId | str), value
            assert await engine_collection.count_documents({"_id": value}) == 1
            assert await engine_collection.count_documents({"_id": value, "n": k + 1}) == 0
            assert await engine_collection.count_documents({"_id": value, "tags": k + 1}) == 1
            assert (await engine_collection.find_one({"_id": value, "tags": k}))["n"] == k
            # A sort on an indexed field reads through the index joined with the documents.
            sorted_ = await engine_collection.find({"_id": value, "n": {"$gte": 0}}).sort("n", 1).to_list()
            assert [found["n"] for found in sorted_] == [k]
    finally:
        connection.set_trace_callback(None)
    assert await engine_collection.count_documents({"$or": [{"_id": ids[0]}, {"n": 5}]}) == 2
    assert await engine_collection.count_documents({"_id": {"$in": [ids[1], ids[2]]}}) == 2
    assert await engine_collection.count_documents({"_id": uuid.uuid4(), "n": 0}) == 0
    assert await engine_collection.count_documents({"_id": 7.0}) == 1  # numeric ids still compare by value
    assert await engine_collection.count_documents({"_id": "Name", "n": 29}) == 0  # strings exactly
    assert await engine_collection.count_documents({"_id": "nam", "n": 29}) == 0


async def vm_steps[T](connection: Any, action: Callable[[], Awaitable[T]]) -> tuple[int, T]:
    """SQLite's virtual-machine instructions (in hundreds) while `action` runs, and what it returned."""
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0  # go on

    connection.set_progress_handler(step, 100)
    try:
        result = await action()
    finally:
        connection.set_progress_handler(None, 0)
    return steps[0], result


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_a_membership_test_reads_its_own_entries(engine_collection: Any) -> None:
    """A filter that tests whether an indexed array holds a value seeks that value's entry for each document it
    looks at (mongoeco walked every entry of the index for every document: confirming one upload to a training
    of 1,000 participants read all 1,000 entries twice); every answer is as before."""
    await engine_collection.create_index("members")
    members = [uuid.uuid4() for _ in range(10)]
    values: list[Any] = [*members, "text", 3, None, ObjectId()]
    await engine_collection.insert_one({"_id": "mine", "owner": members[0], "members": values})
    connection = engine_collection._engine._connection

    async def answers() -> list[int]:
        return [await engine_collection.count_documents(query) for query in (
            {"_id": "mine", "members": members[3]},
            {"_id": "mine", "members": uuid.uuid4()},
            {"_id": "mine", "members": "text"},
            {"_id": "mine", "members": 3.0},  # numbers by value
            {"_id": "mine", "members": Int64(3)},
            {"_id": "mine", "members": "TEXT"},
            {"_id": "mine", "$or": [{"owner": members[5]}, {"members": members[5]}]},
            {"_id": "mine", "$or": [{"owner": members[5]}, {"members": uuid.uuid4()}]},
            {"_id": "mine", "members": {"$in": [uuid.uuid4(), members[9]]}},
        )]

    expected = [1, 0, 1, 1, 1, 0, 1, 0, 1]
    few = await answers()

    async def one_lookup() -> int:
        return int(await engine_collection.count_documents({"_id": "mine", "members": members[3]}))

    steps_alone, found = await vm_steps(connection, one_lookup)
    assert found == 1
    # 2,000 entries of other documents under the same index.
    await engine_collection.insert_many(
        [{"_id": f"other{k}", "members": [uuid.uuid4() for _ in range(200)]} for k in range(10)])
    await one_lookup()  # the first query after the insert re-asks the cached facts of the inserted documents
    steps_among_others, found = await vm_steps(connection, one_lookup)
    assert found == 1
    assert few == expected
    assert await answers() == expected
    assert steps_among_others < 2 * steps_alone + 5, (steps_alone, steps_among_others)
    assert await engine_collection.count_documents({"members": members[3]}) == 1
    assert await engine_collection.count_documents({"$or": [{"owner": uuid.uuid4()}, {"members": members[3]}]}) == 1


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_changes_wait_for_a_change_stream(engine_collection: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes nobody watches start no change delivery (mongoeco leased, started and joined a heartbeat thread per
    written document); a stream opened later still gets every change from its start on, in order."""
    started: list[str] = []
    start = threading.Thread.start

    def recording(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording)
    await engine_collection.insert_many([{"_id": 1}, {"_id": 2}])
    await engine_collection.update_one({"_id": 1}, {"$set": {"x": 1}})
    await engine_collection.delete_many({})
    assert [name for name in started if name.startswith("mongoeco-outbox")] == []
    stream = engine_collection.watch(max_await_time_ms=100)
    try:
        await engine_collection.insert_one({"_id": 3})
        await engine_collection.update_one({"_id": 3}, {"$set": {"x": 3}})
        await engine_collection.delete_one({"_id": 3})
        seen = [await stream.try_next() for _ in range(4)]
    finally:
        stream.close()
    assert [(event["operationType"], event["documentKey"]["_id"]) for event in seen if event] == [
        ("insert", 3), ("update", 3), ("delete", 3)]


def change_records(path: Path) -> tuple[int, int]:
    """Rows in the SQLite file's change outbox and its identity table."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return (connection.execute("SELECT COUNT(*) FROM change_outbox").fetchone()[0],
                connection.execute("SELECT COUNT(*) FROM change_outbox_identities").fetchone()[0])


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_writes_nobody_watches_record_no_change(engine_collection: Any, tmp_path: Path) -> None:
    """mongoeco recorded a gap (a serialised copy, an identity, an outbox row, a compaction) for every document
    written while no stream watched; nothing can resume across it over the wire, so nothing is recorded. A
    stream that watches still gets its changes."""
    await engine_collection.insert_many([{"_id": n} for n in range(5)])
    await engine_collection.update_many({}, {"$set": {"x": 1}})
    await engine_collection.delete_many({"_id": {"$lt": 3}})
    assert change_records(tmp_path / "engine.sqlite3") == (0, 0)
    assert await engine_collection.count_documents({"x": 1}) == 2
    stream = engine_collection.watch(max_await_time_ms=100)
    try:
        await engine_collection.update_one({"_id": 4}, {"$set": {"x": 2}})
        seen = await stream.try_next()
    finally:
        stream.close()
    assert (seen["operationType"], seen["documentKey"]["_id"]) == ("update", 4)


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_a_delete_many_is_one_store_job(engine_collection: Any, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """mongoeco deleted each matched document by a store job and a transaction of its own, queued behind every
    other client's commands (a round's clean-up fell six rounds behind in twenty); one job deletes them all, with
    their index entries, and only documents that still match."""
    await engine_collection.create_index("round")
    await engine_collection.create_index("tags")
    await engine_collection.create_index("code", unique=True)
    await engine_collection.create_index("expires", expire_after_seconds=3600)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    await engine_collection.insert_many([{"_id": n, "round": n % 4, "tags": [n, n + 100], "code": f"c{n}",
                                          "expires": soon} for n in range(40)])
    engine = engine_collection._engine
    jobs: list[str] = []
    run_blocking = engine._run_blocking

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(func, "__name__", repr(func)))
        return await run_blocking(func, *args, **kwargs)

    monkeypatch.setattr(engine, "_run_blocking", counted)
    result = await engine_collection.delete_many({"round": 1})
    monkeypatch.undo()
    assert result.deleted_count == 10
    assert len(jobs) <= 3  # the match, the deletion (mongoeco: one per document, 10 more)
    assert await engine_collection.count_documents({}) == 30
    assert await engine_collection.count_documents({"round": 1}) == 0
    assert await engine_collection.count_documents({"tags": 105}) == 0  # multikey entries gone
    assert await engine_collection.count_documents({"tags": 104}) == 1
    await engine_collection.insert_one({"_id": 1, "round": 1, "code": "c1"})  # unique key and _id free again
    with contextlib.closing(sqlite3.connect(tmp_path / "engine.sqlite3")) as connection:
        assert connection.execute("SELECT COUNT(*) FROM ttl_index_entries").fetchone()[0] == 30
    assert (await engine_collection.delete_many({"round": 9})).deleted_count == 0
    monkeypatch.setattr(mongoeco_fixes, "DELETE_JOB_DOCUMENTS", 4)  # a large delete takes turns with others
    assert (await engine_collection.delete_many({"round": 3})).deleted_count == 10
    assert await engine_collection.count_documents({"round": 3}) == 0
    monkeypatch.undo()
    stream = engine_collection.watch(max_await_time_ms=100)  # a watched delete_many still reports each document
    try:
        assert (await engine_collection.delete_many({"round": 2})).deleted_count == 10
        seen = [await stream.try_next() for _ in range(10)]
    finally:
        stream.close()
    assert sorted(event["documentKey"]["_id"] for event in seen if event) == list(range(2, 40, 4))


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_updates_keep_multikey_entries_they_leave_as_they_are(engine_collection: Any) -> None:
    """An update that changes no indexed array leaves its multikey entries alone (mongoeco deleted and re-inserted
    every entry: two thirds of a training update's CPU at 1,000 participants); one that changes an array is still
    seen by queries through the index."""
    await engine_collection.create_index("members")
    users = [uuid.uuid4() for _ in range(50)]
    await engine_collection.insert_one({"_id": "t", "members": users, "round": 0})
    statements: list[str] = []
    connection = engine_collection._engine._connection
    connection.set_trace_callback(statements.append)
    try:
        await engine_collection.update_one({"_id": "t"}, {"$set": {"round": 1}})
        rewrites = [sql for sql in statements if "multikey_entries" in sql and sql.lstrip().startswith(("DELETE", "INSERT"))]
        assert rewrites == []
    finally:
        connection.set_trace_callback(None)
    newcomer = uuid.uuid4()
    await engine_collection.update_one({"_id": "t"}, {"$push": {"members": newcomer}, "$set": {"round": 2}})
    await engine_collection.update_one({"_id": "t"}, {"$pull": {"members": users[0]}})
    for member, expected in ((newcomer, 1), (users[0], 0), (users[1], 1), (uuid.uuid4(), 0)):
        assert await engine_collection.count_documents({"members": member}) == expected
    await engine_collection.update_one({"_id": "t"}, {"$set": {"members": [users[0]]}})
    assert await engine_collection.count_documents({"members": users[0]}) == 1
    assert await engine_collection.count_documents({"members": users[1]}) == 0


def entry_indexes(path: Path) -> dict[str, list[str]]:
    """The SQLite indexes over mongoeco's two index-entry tables, by table."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND tbl_name IN "
                                  "('scalar_index_entries', 'multikey_entries') ORDER BY name").fetchall()
    finally:
        connection.close()
    found: dict[str, list[str]] = {}
    for table, name in rows:
        found.setdefault(table, []).append(name)
    return found


SHARED_ONLY = {"scalar_index_entries": ["idx_scalar_index_entries_storage", "scalar_index_entries_shared"],
               "multikey_entries": ["multikey_entries_shared"]}


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_index_entries_are_written_once_whatever_the_number_of_indexes(
        engine_collection: Any, tmp_path: Path) -> None:
    """Each MongoDB index got an identical SQLite index over the shared entry tables, so an entry was written into
    as many B-trees as there are indexes; one index per table answers every lookup through any of them."""
    for field in ("a", "b", "c", "tags", "members"):
        await engine_collection.create_index(field)
    await engine_collection.create_index("code", unique=True)
    await engine_collection.insert_many([{"_id": n, "a": n, "b": n % 3, "c": f"c{n}", "code": n, "tags": [n, n + 1],
                                          "members": [f"m{n}"]} for n in range(30)])
    assert entry_indexes(tmp_path / "engine.sqlite3") == SHARED_ONLY
    assert [doc["_id"] async for doc in engine_collection.find({"a": 7})] == [7]
    assert await engine_collection.count_documents({"b": 1}) == 10
    assert [doc["_id"] async for doc in engine_collection.find({"tags": 8}).sort("_id", 1)] == [7, 8]
    assert await engine_collection.count_documents({"members": "m3"}) == 1
    with pytest.raises(DuplicateKeyError):
        await engine_collection.insert_one({"_id": 99, "code": 5})
    await engine_collection.drop_index("a_1")  # the shared index stays for the others
    assert entry_indexes(tmp_path / "engine.sqlite3") == SHARED_ONLY
    assert [doc["_id"] async for doc in engine_collection.find({"c": "c4"})] == [4]


def test_a_stored_database_moves_to_the_shared_entry_indexes(tmp_path: Path) -> None:
    """A database written before the correction loses its per-index entry indexes when the store opens it."""
    path = tmp_path / "old.sqlite3"
    connection = sqlite3.connect(path)
    columns = "(collection_id, index_name, type_score, element_key, storage_key)"
    connection.execute(f"CREATE TABLE scalar_index_entries {columns}")
    connection.execute(f"CREATE TABLE multikey_entries {columns}")
    for name, table in (("scidx_0a1b", "scalar_index_entries"), ("scidx_2c3d", "scalar_index_entries"),
                        ("mkidx_4e5f", "multikey_entries")):
        connection.execute(f'CREATE INDEX "{name}" ON {table} {columns}')
    connection.execute("CREATE INDEX idx_scalar_index_entries_storage ON scalar_index_entries (collection_id, storage_key)")
    connection.commit()
    connection.close()
    for _ in range(2):  # idempotent
        mongoeco_fixes.share_entry_indexes(str(path))
        assert entry_indexes(path) == SHARED_ONLY


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_a_validator_is_compiled_once_and_still_enforced(
        engine_collection: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """mongoeco compiled a collection's `$jsonSchema` again on every insert and update (a twentieth of the store's
    CPU in a round); each validator is compiled once, and a collection created with another one gets its rules."""
    from mongoeco.engines import semantic_core

    compiled: list[object] = []
    original = semantic_core.compile_collection_validator
    monkeypatch.setattr(semantic_core, "compile_collection_validator",
                        lambda options, **kwargs: compiled.append(options) or original(options, **kwargs))
    database = engine_collection.database
    field = f"n{uuid.uuid4().hex}"  # a validator no earlier test compiled
    schema = {"bsonType": "object", "required": [field], "properties": {field: {"bsonType": "int", "minimum": 0}}}
    checked = await database.create_collection("checked", validator={"$jsonSchema": schema})
    for number in range(10):
        await checked.insert_one({"_id": number, field: number})
        await checked.update_one({"_id": number}, {"$inc": {field: 1}})
    with pytest.raises(WriteError):
        await checked.insert_one({"_id": 99, field: -1})
    with pytest.raises(WriteError):
        await checked.update_one({"_id": 3}, {"$set": {field: -5}})
    assert len(compiled) <= 2  # at creation, then once for every write
    await checked.drop()
    stricter = {**schema, "properties": {field: {"bsonType": "int", "minimum": 10}}}
    checked = await database.create_collection("checked", validator={"$jsonSchema": stricter})
    with pytest.raises(WriteError):
        await checked.insert_one({"_id": 1, field: 5})
    await checked.insert_one({"_id": 1, field: 15})


FACT_VALUES: list[Any] = [
    0, 1, 2.5, -3, Int64(7), "a", "m", "z", "é", "Ünï", True, None, uuid.UUID(int=5), ObjectId("64b7f0c2a1b2c3d4e5f60718"),
    b"\x00\x01", datetime(2026, 1, 2, tzinfo=UTC), [1, 2], ["a", "é"], [], [[1], 2], {"b": 1}, {"b": "é"},
    {"b": [1, "x"]}, [{"b": 2}, {"b": "y"}],
]
FACT_QUERIES: list[Raw] = [
    {"a": 1}, {"a": "a"}, {"a": 2.5}, {"a": [1, 2]}, {"a": None}, {"a": uuid.UUID(int=5)}, {"a": b"\x00\x01"},
    {"a": {"$gt": 0}}, {"a": {"$lt": "n"}}, {"a": {"$gte": "é"}}, {"a.b": 1}, {"a.b": "y"}, {"a.b": {"$gt": 0}},
    {"s": {"$lt": "m"}}, {"s": "é"}, {"n": {"$gte": 1}}, {"n": 2.5}, {"a": {"$in": [1, "z", None]}},
    {"$or": [{"a": "m"}, {"n": {"$lt": 1}}]}, {"n": {"$lte": 2}},
]


@pytest.mark.parametrize("seed", range(6))
async def test_writes_keep_only_the_facts_they_leave_true(fixed_mongoeco: None, tmp_path: Path, seed: int) -> None:
    """A write keeps the collection's cached "no document has it" facts its own documents do not falsify (before,
    every update dropped them all and the next query scanned the whole collection again, per fact). Random
    inserts, updates, replacements and deletes of documents with every kind of value, each followed by every
    query, answer exactly what a second SQLite engine answers that works out every fact afresh for each query."""
    import random

    import mongoeco
    from mongoeco.engines.sqlite import SQLiteEngine

    chance = random.Random(seed)
    engines = [SQLiteEngine(str(tmp_path / "kept.sqlite3")), SQLiteEngine(str(tmp_path / "afresh.sqlite3"))]
    clients = [mongoeco.AsyncMongoClient(engine) for engine in engines]

    def document() -> Raw:
        fields = {"a": chance.choice(FACT_VALUES), "s": chance.choice(["a", "m", "z", "é", 3, None]),
                  "n": chance.choice([0, 1, 2.5, Int64(2), "x", [1, 3]])}
        return {name: value for name, value in fields.items() if chance.random() < 0.85}

    async with clients[0], clients[1]:
        collections = [client["db"]["things"] for client in clients]
        for collection in collections:
            await collection.create_index("s")
            await collection.insert_many([{"_id": k, "a": k % 3, "s": "b", "n": k} for k in range(8)])
        next_id = 8
        for step in range(60):
            for query in FACT_QUERIES:
                engines[1]._collection_features_cache.clear()
                answers = [sorted(map(repr, await c.distinct("_id", query))) for c in collections]
                assert answers[0] == answers[1], (step, query, answers)
            action = chance.choice(["insert", "update", "update", "set_many", "replace", "delete"])
            target, new = chance.randrange(next_id), document()
            for collection in collections:
                if action == "insert":
                    await collection.insert_one({"_id": next_id, **new})
                elif action == "update":
                    await collection.update_one({"_id": target}, {"$set": {"a": new.get("a"), "n": new.get("n")}})
                elif action == "set_many":
                    await collection.update_many({"n": {"$gte": 1}}, {"$set": {"s": ["z", "é", "a"][step % 3]}})
                elif action == "replace":
                    await collection.replace_one({"_id": target}, new)
                else:
                    await collection.delete_one({"_id": target})
            next_id += action == "insert"
        cache = engines[0]._collection_features_cache
        kept = [key for key, value in cache.items() if value is False] + list(cache.awaiting)
        assert kept, "no fact outlived the last write: the queries did not exercise the correction"


@pytest.mark.parametrize("engine_collection", ["sqlite"], indirect=True)
async def test_an_update_without_the_feature_keeps_the_fact(engine_collection: Any) -> None:
    """An update that puts no array at a field keeps "no document has an array there": the next unique-index
    check reads only the updated document for it, not the collection; one that does put an array there turns
    the fact (asked of that document alone), and the index sees the array."""
    await engine_collection.create_index("k", unique=True)
    await engine_collection.insert_many([{"_id": i, "k": i, "v": "x"} for i in range(STORED)])
    await engine_collection.insert_one({"_id": STORED, "k": STORED})
    statements: list[str] = []
    connection = engine_collection._engine._connection

    def array_checks(restricted: bool) -> int:
        return sum(1 for sql in statements
                   if "json_type(document, '$.k') = 'array'" in sql and ("storage_key IN" in sql) == restricted)

    def whole_collection_scans() -> int:
        return array_checks(restricted=False)

    connection.set_trace_callback(statements.append)
    try:
        for i in range(10):
            await engine_collection.update_one({"_id": i}, {"$set": {"v": f"y{i}", "w": [i]}})
            await engine_collection.insert_one({"_id": STORED + 1 + i, "k": STORED + 1 + i})
        assert whole_collection_scans() == 0  # before: one after every update
        rechecks = array_checks(restricted=True)
        await engine_collection.update_one({"_id": 5}, {"$set": {"k": [500, 501]}})
        with pytest.raises(DuplicateKeyError):
            await engine_collection.insert_one({"k": 501})
        assert array_checks(restricted=True) > rechecks
        assert whole_collection_scans() == 0
    finally:
        connection.set_trace_callback(None)
    assert await engine_collection.count_documents({"k": 500}) == 1
