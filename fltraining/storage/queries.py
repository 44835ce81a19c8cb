"""Read helpers shared by the services."""

from collections.abc import Iterator, Sequence
from typing import Any

from beanie import Document
from bson.binary import UuidRepresentation
from pymongo.asynchronous.collection import AsyncCollection

# The embedded store compiles `$in` into nested SQL, and SQLite refuses expressions deeper than 1,000 levels:
# 450 values already fail there (MongoDB takes any length). Long lists are asked for in pieces of this size.
IN_CHUNK = 400


def in_chunks[T](values: Sequence[T]) -> Iterator[list[T]]:
    """A list of `$in` values in pieces every supported store can compile."""
    for start in range(0, len(values), IN_CHUNK):
        yield list(values[start:start + IN_CHUNK])


async def find_document[D: Document](document: type[D], query: dict[str, Any]) -> D | None:
    """One document matching a query, parsed into its model.

    Beanie's own `get`/`find_one` send a projection of every field, which the embedded store
    evaluates slowly (6 ms instead of 3.5 ms per lookup); a plain find returns the same fields.
    """
    raw = await document.get_pymongo_collection().find_one(query)
    return None if raw is None else document.model_validate(raw)


async def count_matching(collection: AsyncCollection[dict[str, Any]], query: dict[str, Any]) -> int:
    """How many documents match a query, by the `count` command.

    `count_documents` runs a `$match`/`$group` aggregation, which the embedded store answers by decoding
    every matching document (20 ms for 100, 160 ms for 1,000); `count` with a query is answered from an
    index (1.5 ms either way), on MongoDB as well. It is exact except on a sharded cluster while chunks
    migrate (orphaned documents), where a list's `X-Total-Count` may briefly over-count.
    """
    database = collection.database
    reply = await database.command({"count": collection.name, "query": query},
                                   codec_options=collection.codec_options)
    return int(reply["n"])


def reading_raw_uuids(collection: AsyncCollection[dict[str, Any]]) -> AsyncCollection[dict[str, Any]]:
    """The collection with UUIDs read as BSON binaries (subtype 4) instead of `uuid.UUID`s.

    Decoding the 300 UUIDs of a page of 100 trainings into `uuid.UUID` (Python code in the BSON decoder)
    took half of the page's decoding (1.2 of 2.2 ms); the encoder writes binaries as UUID text directly.
    Filters on this collection must give UUIDs as `Binary.from_uuid(...)`.
    """
    options = collection.codec_options.with_options(uuid_representation=UuidRepresentation.UNSPECIFIED)
    return collection.with_options(codec_options=options)
