"""Concurrent lookups of documents by one unique field, answered by one `$in` read per batch.

While a read is under way, the lookups that arrive wait for the next one, which asks for all of them
at once: a lone lookup costs what a `find_one` costs, and a thousand clients authenticating at once
cost a few reads instead of a thousand. Each read still asks the database, so nothing is served
from memory.
"""

import asyncio
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from fltraining.storage.queries import IN_CHUNK


class BatchedLookup:
    """Finds documents by a unique field, coalescing the lookups that arrive during a read."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]], field: str) -> None:
        self._collection = collection
        self._field = field
        self._waiting: dict[Any, asyncio.Future[dict[str, Any] | None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def find(self, value: Any) -> dict[str, Any] | None:
        """The stored document whose field equals `value`, or None."""
        future = self._waiting.get(value)
        if future is None:
            future = self._waiting[value] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_observed)  # a waiter that gave up leaves no unretrieved error behind
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all())
        return await asyncio.shield(future)

    async def _read_all(self) -> None:
        batch: dict[Any, asyncio.Future[dict[str, Any] | None]] = {}
        try:
            while self._waiting:
                values = list(self._waiting)[:IN_CHUNK]  # what every supported store compiles
                batch = {value: self._waiting.pop(value) for value in values}
                try:
                    found = {raw[self._field]: raw async for raw in self._collection.find(
                        {self._field: {"$in": values}})}
                except Exception as error:  # every waiter of this read sees the failure
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(error)
                    continue
                for value, future in batch.items():
                    if not future.done():
                        future.set_result(found.get(value))
        finally:  # only when cancelled are futures left: their waiters are cancelled too
            for future in [*batch.values(), *self._waiting.values()]:
                future.cancel()
            self._waiting.clear()
            self._reader = None


def _observed(future: asyncio.Future[dict[str, Any] | None]) -> None:
    if not future.cancelled():
        future.exception()
