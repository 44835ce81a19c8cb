"""Whether a stored file is still named by any document."""

import asyncio
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from beanie import Document

from fltraining.documents import FILE_REFERENCES, Model, Training


def _fields_by_collection() -> list[tuple[type[Document], list[str]]]:
    fields: dict[type[Document], list[str]] = {}
    for document, field in FILE_REFERENCES:
        fields.setdefault(document, []).append(field)
    return list(fields.items())


# The reference fields grouped by the collection that holds them: one read per collection.
FIELDS_BY_COLLECTION = _fields_by_collection()
# Updates, SWAG statistics and data sets each stage a file of their own at upload, which no other document
# names; a model's file is named only by models (a clone shares its original's) and by pending effects.
MODEL_FILE_HOLDERS = frozenset({Model, Training})


async def file_in_use(file_id: UUID, model_file: bool = False) -> bool:
    """True when a model, update, SWAG statistic, data set or pending effect names the file (a read per collection;
    for a `model_file`, a model's or its server optimizer's, only models and pending effects are read)."""
    found = await asyncio.gather(*(
        document.get_pymongo_collection().find_one(
            {fields[0]: file_id} if len(fields) == 1 else {"$or": [{field: file_id} for field in fields]}, {"_id": 1})
        for document, fields in FIELDS_BY_COLLECTION
        if not model_file or document in MODEL_FILE_HOLDERS
    ))
    return any(item is not None for item in found)


def _values_at(value: Any, path: list[str]) -> Iterator[Any]:
    """The values a dotted path reaches in a document, through arrays as MongoDB does."""
    if isinstance(value, list):
        for item in value:
            yield from _values_at(item, path)
    elif not path:
        yield value
    elif isinstance(value, dict) and path[0] in value:
        yield from _values_at(value[path[0]], path[1:])


async def _named_by(document: type[Document], field: str) -> set[Any]:
    # A projected read rather than `distinct`: the embedded store's `distinct` compares every pair of values
    # (a quarter of its CPU with a few thousand stored updates, every sweep).
    cursor = document.get_pymongo_collection().find({field: {"$ne": None}}, {field: 1, "_id": 0})
    return {value async for raw in cursor for value in _values_at(raw, field.split("."))}


async def referenced_file_ids() -> set[UUID]:
    """Every file id some document names (one projected read per reference)."""
    found = await asyncio.gather(*(_named_by(document, field) for document, field in FILE_REFERENCES))
    return {file_id for ids in found for file_id in ids if file_id is not None}
