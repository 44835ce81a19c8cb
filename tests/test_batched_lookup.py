"""Credential reads of many clients at once: batched into few reads, each answer still from the database."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson.errors import InvalidDocument
from pymongo.asynchronous.collection import AsyncCollection

from fltraining.storage.batched_lookup import BatchedLookup
from fltraining.storage.command_counts import CommandCounter
from fltraining.storage.database import database_name, make_client
from fltraining.storage.queries import IN_CHUNK


@pytest.fixture
async def counted(database_url: str) -> AsyncIterator[tuple[AsyncCollection[dict[str, Any]], CommandCounter]]:
    """A collection of 600 named documents, and the count of commands sent after they were written."""
    counter = CommandCounter()
    mongo = make_client(database_url, [counter])
    collection = mongo[database_name(database_url, "fltraining")]["lookups"]
    await collection.create_index("name", unique=True)
    await collection.insert_many([{"name": f"n{index}", "index": index} for index in range(600)])
    counter.counts.clear()
    yield collection, counter
    await mongo.close()


async def test_a_burst_of_lookups_is_answered_by_a_few_reads(
        counted: tuple[AsyncCollection[dict[str, Any]], CommandCounter]) -> None:
    collection, counter = counted
    lookup = BatchedLookup(collection, "name")
    names = [f"n{index}" for index in range(0, 600, 2)] + ["missing", "n4"]  # one unknown, one asked twice
    found = await asyncio.gather(*(lookup.find(name) for name in names))
    assert [None if raw is None else raw["index"] for raw in found] == [*range(0, 600, 2), None, 4]
    # The first lookup's read, then one for all that arrived meanwhile: not one read per lookup.
    assert counter.counts["find lookups"] <= 3


async def test_one_read_asks_for_at_most_a_batch(counted: tuple[AsyncCollection[dict[str, Any]], CommandCounter]) -> None:
    collection, counter = counted
    lookup = BatchedLookup(collection, "name")
    found = await asyncio.gather(*(lookup.find(f"n{index}") for index in range(600)))
    assert [raw["index"] for raw in found if raw is not None] == list(range(600))
    assert counter.counts["find lookups"] >= 600 // IN_CHUNK + 1


async def test_every_lookup_reads_the_database_again(counted: tuple[AsyncCollection[dict[str, Any]], CommandCounter]) -> None:
    collection, counter = counted
    lookup = BatchedLookup(collection, "name")
    assert (await lookup.find("n1"))["index"] == 1  # type: ignore[index]
    await collection.delete_one({"name": "n1"})
    assert await lookup.find("n1") is None
    assert counter.counts["find lookups"] == 2


async def test_a_failed_read_fails_every_lookup_it_carried(
        counted: tuple[AsyncCollection[dict[str, Any]], CommandCounter]) -> None:
    collection, _ = counted
    lookup = BatchedLookup(collection, "name")
    # A value no read can carry fails the whole read, the lookups that shared it included.
    results = await asyncio.gather(lookup.find(object()), lookup.find("n2"), lookup.find("n3"), return_exceptions=True)
    assert all(isinstance(result, InvalidDocument) for result in results)
    assert (await lookup.find("n2"))["index"] == 2  # type: ignore[index]
