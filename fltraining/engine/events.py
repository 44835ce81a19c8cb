"""Reading a training's audit trail."""

from typing import Any
from uuid import UUID

from fltraining.documents import Event


async def list_events(training_id: UUID, after: str | None, limit: int) -> list[dict[str, Any]]:
    """A training's events in the order they happened, after the one named (ids sort by time)."""
    query: dict[str, Any] = {"training": training_id}
    if after is not None:
        query["_id"] = {"$gt": after}
    cursor = Event.get_pymongo_collection().find(query).sort("_id", 1).limit(limit)
    return [{**raw, "id": raw.pop("_id")} async for raw in cursor]
