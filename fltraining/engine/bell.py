"""Wakes this process's event streams when this process committed something about a training."""

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from uuid import UUID


class ChangeBell:
    """Per training, the events of the streams waiting for its next change in this process."""

    def __init__(self) -> None:
        self._waiters: defaultdict[UUID, set[asyncio.Event]] = defaultdict(set)

    def ring(self, training_id: UUID) -> None:
        """Something about the training was committed here: wake whoever listens."""
        for waiter in self._waiters.get(training_id, ()):
            waiter.set()

    @contextlib.contextmanager
    def listen(self, training_id: UUID) -> Iterator[asyncio.Event]:
        """An event set at the training's next ring (clear it before each wait)."""
        waiter = asyncio.Event()
        self._waiters[training_id].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[training_id].discard(waiter)
            if not self._waiters[training_id]:
                del self._waiters[training_id]
