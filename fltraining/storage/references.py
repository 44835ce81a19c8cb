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
