"""Who arrived in a round's waiting phase.

Local updates and SWAG statistics are their own record of arrival: one document per participant
and round (a unique index), so an upload writes nothing into the training, and completion is a
`count` of the round's documents (index-served). Test metrics, which have no document of their
own per participant, are still counted in the training's `round_arrived`.
"""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from beanie import Document

from fltraining.documents import SwagStatistic, Training, Update
from fltraining.engine.plans import expected_count
from fltraining.states import Phase
from fltraining.storage.queries import count_matching

RECORDED_BY: dict[Phase, type[Document]] = {Phase.UPDATES: Update, Phase.SWAG: SwagStatistic}

Arrivals = dict[UUID, dict[str, Any]]  # a round's stored contributions by user, as read


async def count_stored(phase: Phase, training_id: UUID, round_: int) -> int:
    """How many contributions of a round's phase are stored (including any of users removed since)."""
    return await count_matching(RECORDED_BY[phase].get_pymongo_collection(), {"training": training_id, "round": round_})


def counted_outside(raw: dict[str, Any]) -> bool:
    """Whether a stored training's current phase counts arrivals in their own documents (not in the training)."""
    phase = raw.get("phase")
    return phase is not None and Phase(phase) in RECORDED_BY


async def arrived_count(raw: dict[str, Any]) -> int:
    """A stored training's arrivals in its current phase, as the detail shows them."""
    phase = raw.get("phase")
    if phase is None:
        return 0
    if Phase(phase) in RECORDED_BY:
        return await count_stored(Phase(phase), raw["_id"], raw["round"])
    return len(raw.get("round_arrived", []))


async def arrived_documents(training: Training) -> Arrivals:
    """The stored contributions of the round's participants to the current phase, which records them in documents
    of their own (`RECORDED_BY`), by user: whole documents, which the aggregation takes over when all are there.

    Only round participants count: an upload whose confirmation failed may be stored a moment before it is
    removed again.
    """
    assert training.phase in RECORDED_BY
    participants = set(training.round_participants)
    cursor = RECORDED_BY[training.phase].get_pymongo_collection().find(
        {"training": training.id, "round": training.round})
    return {raw["user"]: raw async for raw in cursor if raw["user"] in participants}


ARRIVAL_FIELDS = {"user": 1, "created_at": 1, "sample_size": 1, "size": 1, "sha256": 1, "_id": 0}


async def arrivals_of(training: Training) -> list[dict[str, Any]]:
    """The current phase's arrivals of round participants, oldest first: user, time, sample size, bytes."""
    phase = training.phase
    if phase is None or phase == Phase.AGGREGATING:
        return []
    participants = set(training.round_participants)
    if phase not in RECORDED_BY:
        return [{"user": user, "at": None} for user in training.round_arrived if user in participants]
    cursor = RECORDED_BY[phase].get_pymongo_collection().find(
        {"training": training.id, "round": training.round}, ARRIVAL_FIELDS).sort("created_at", 1)
    return [{**raw, "at": raw.pop("created_at", None)} async for raw in cursor if raw["user"] in participants]


@dataclass(frozen=True)
class Progress:
    """Where a training stands, as an event stream reports it between events."""

    state: str
    settled: bool  # no effects of its last steps are still to be applied
    round: int
    phase: str | None
    arrived: int
    expected: int


PROGRESS_FIELDS = {"state": 1, "phase": 1, "round": 1, "participants": 1, "round_participants": 1,
                   "round_arrived": 1, "effects.id": 1}


async def progress_of(training_id: UUID) -> Progress | None:
    """A training's state and its current phase's arrivals (None once it is deleted)."""
    raw = await Training.get_pymongo_collection().find_one({"_id": training_id}, PROGRESS_FIELDS)
    if raw is None:
        return None
    waiting = raw.get("phase") not in (None, str(Phase.AGGREGATING))
    expected = expected_count(raw) if waiting else 0
    return Progress(state=raw["state"], settled=not raw.get("effects"), round=raw["round"], phase=raw.get("phase"),
                    arrived=await arrived_count(raw) if waiting else 0, expected=expected)
