"""Whether a stored file is still named by any document."""

from uuid import UUID

from fltraining.documents import FILE_REFERENCES


async def file_in_use(file_id: UUID) -> bool:
    """True when a model, update, SWAG statistic or pending effect names the file."""
    for document, field in FILE_REFERENCES:
        if await document.get_pymongo_collection().find_one({field: file_id}, {"_id": 1}):
            return True
    return False
