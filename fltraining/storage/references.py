"""Whether a stored file is still named by any document."""

import asyncio
from uuid import UUID

from fltraining.documents import FILE_REFERENCES


async def file_in_use(file_id: UUID) -> bool:
    """True when a model, update, SWAG statistic or pending effect names the file."""
    found = await asyncio.gather(*(
        document.get_pymongo_collection().find_one({field: file_id}, {"_id": 1})
        for document, field in FILE_REFERENCES
    ))
    return any(item is not None for item in found)


async def referenced_file_ids() -> set[UUID]:
    """Every file id some document names (one `distinct` per reference)."""
    found = await asyncio.gather(*(
        document.get_pymongo_collection().distinct(field) for document, field in FILE_REFERENCES
    ))
    return {file_id for ids in found for file_id in ids if file_id is not None}
