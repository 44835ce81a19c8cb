"""Noticing a complete round: no store operation when this process's uploads reach the expected number."""

import uuid
from uuid import UUID

import pytest

from fltraining.engine import completion
from fltraining.engine.completion import CompletionWatch
from fltraining.states import Phase

pytestmark = pytest.mark.store_independent


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A stand-in for the store: two contributions stored; counts the reads of the training and the counts."""
    calls = {"training reads": 0, "counts": 0}

    async def read_expected(training_id: UUID) -> int:
        calls["training reads"] += 1
        return 2

    async def count_stored(phase: Phase, training_id: UUID, round_: int) -> int:
        calls["counts"] += 1
        return 2

    monkeypatch.setattr(CompletionWatch, "_read_expected", staticmethod(read_expected))
    monkeypatch.setattr(completion, "count_stored", count_stored)
    return calls


async def test_a_round_is_noticed_without_a_count(store: dict[str, int]) -> None:
    """Two uploads confirmed here, each of which stored its own document: the engine is woken and told the
    round's documents are all stored (it reads them and decides), with no count of them first."""
    kicked: list[UUID] = []
    watch = CompletionWatch(kicked.append, settle_seconds=60)
    training = uuid.uuid4()
    await watch.arrived(training, Phase.UPDATES, 3, fresh=True)
    assert (kicked, store) == ([], {"training reads": 1, "counts": 0})
    await watch.arrived(training, Phase.UPDATES, 3, fresh=True)
    assert (kicked, store) == ([training], {"training reads": 1, "counts": 0})
    assert watch.counted_complete(training, 3, Phase.UPDATES)
    assert not watch.counted_complete(training, 3, Phase.UPDATES)  # told once
    watch.close()


async def test_a_retry_that_found_its_twin_counts(store: dict[str, int]) -> None:
    """A retry may be the upload whose first attempt died before waking anybody: it counts the stored documents."""
    kicked: list[UUID] = []
    watch = CompletionWatch(kicked.append, settle_seconds=60)
    training = uuid.uuid4()
    await watch.arrived(training, Phase.UPDATES, 3, fresh=False)
    assert (kicked, store) == ([training], {"training reads": 1, "counts": 1})
    watch.close()


async def test_a_phase_this_process_opened_is_not_read(store: dict[str, int]) -> None:
    kicked: list[UUID] = []
    watch = CompletionWatch(kicked.append, settle_seconds=60)
    training = uuid.uuid4()
    watch.expect(training, 3, Phase.UPDATES, 2)
    await watch.arrived(training, Phase.UPDATES, 3, fresh=True)
    await watch.arrived(training, Phase.UPDATES, 3, fresh=True)
    assert (kicked, store) == ([training], {"training reads": 0, "counts": 0})
    watch.close()
