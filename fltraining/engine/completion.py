"""Noticing that a round's contributions are complete, without a store operation per upload.

Each process counts the contributions it confirmed per (training, round, phase). When its own count
reaches the number of round participants (known from the step that opened the phase when this process
took it, else read once per round and process), every one of them is stored (each confirmed upload
stored its own document, one per participant): it wakes the engine, which reads the round's documents
and decides exactly, without a count first. With several processes no single count reaches the total,
so a process also counts the stored documents (one index-served `count`) once its uploads pause for
`SETTLE_SECONDS` (one count per burst, not per upload), and a retry that found its twin counts too (its
first attempt may have died before waking anybody). The reconciler still looks at every running
training, so a lost wake-up only delays a round.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from uuid import UUID

from pymongo.errors import PyMongoError

from fltraining.documents import Training
from fltraining.engine.arrivals import count_stored
from fltraining.engine.plans import expected_count
from fltraining.states import Phase

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.25
MAX_ROUNDS = 10_000

Key = tuple[UUID, int, Phase]


class CompletionWatch:
    """Per process: contributions confirmed here, and a wake-up for the engine when a round may be complete."""

    def __init__(self, kick: Callable[[UUID], None], settle_seconds: float = SETTLE_SECONDS) -> None:
        self._kick = kick
        self._settle = settle_seconds
        self._expected: dict[Key, int] = {}
        self._confirmed: dict[Key, int] = {}
        self._later: dict[Key, asyncio.TimerHandle] = {}
        self._reading: dict[Key, asyncio.Future[int | None]] = {}
        self._checking: set[asyncio.Task[None]] = set()
        self._counted: set[Key] = set()  # counted complete here just now: the engine need not count again

    async def arrived(self, training_id: UUID, phase: Phase, round_: int, fresh: bool) -> None:
        """A contribution was confirmed (`fresh`: stored by this request, not a retry finding its twin)."""
        key = (training_id, round_, phase)
        expected = await self._expected_in(key)
        if expected is None:
            return
        if not fresh:  # a retry may be the one a crash kept from waking anybody
            await self._check(key)
            return
        self._confirmed[key] = self._confirmed.get(key, 0) + 1
        if self._confirmed[key] >= expected:
            self._complete(key)
            return
        self._cancel_later(key)
        loop = asyncio.get_running_loop()
        self._later[key] = loop.call_later(self._settle, self._start_check, key)

    def expect(self, training_id: UUID, round_: int, phase: Phase, expected: int) -> None:
        """Note how many contributions a phase this process just opened waits for (spares the read per round)."""
        self._remember((training_id, round_, phase), expected)

    def counted_complete(self, training_id: UUID, round_: int, phase: Phase) -> bool:
        """Whether this watch just found the phase's contributions all stored (told once)."""
        key = (training_id, round_, phase)
        if key in self._counted:
            self._counted.discard(key)
            return True
        return False

    def _remember(self, key: Key, expected: int) -> None:
        if key not in self._expected and len(self._expected) >= MAX_ROUNDS:  # rounds long over: only a cache
            self._expected.clear()
            self._confirmed.clear()
            self._counted.clear()
        self._expected.setdefault(key, expected)

    async def _expected_in(self, key: Key) -> int | None:
        if (expected := self._expected.get(key)) is not None:
            return expected
        # One read per round and process, however many uploads arrive while it is under way.
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read_expected(key[0]))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        expected = await asyncio.shield(reading)
        if expected is not None:
            self._remember(key, expected)
        return self._expected.get(key, expected)

    @staticmethod
    async def _read_expected(training_id: UUID) -> int | None:
        raw = await Training.get_pymongo_collection().find_one({"_id": training_id})
        if raw is None:
            return None
        return expected_count(raw)

    async def _check(self, key: Key) -> None:
        self._cancel_later(key)
        training_id, round_, phase = key
        if await count_stored(phase, training_id, round_) >= self._expected.get(key, 0):
            self._complete(key)

    def _complete(self, key: Key) -> None:
        self._cancel_later(key)
        self._counted.add(key)
        self._kick(key[0])

    def _cancel_later(self, key: Key) -> None:
        if (handle := self._later.pop(key, None)) is not None:
            handle.cancel()

    def _start_check(self, key: Key) -> None:
        task = asyncio.get_running_loop().create_task(self._check_later(key))
        self._checking.add(task)
        task.add_done_callback(self._checking.discard)

    async def _check_later(self, key: Key) -> None:
        self._later.pop(key, None)
        with contextlib.suppress(PyMongoError):  # the reconciler looks again
            await self._check(key)

    def close(self) -> None:
        """Cancel the pending checks (at shutdown: the reconciler of any process looks again)."""
        for handle in self._later.values():
            handle.cancel()
        self._later.clear()
        for task in self._checking:
            task.cancel()
