"""Effects: what a step of the engine causes besides its own update.

A step writes its effects into the training document in the same conditional update as the
state it changes (a transactional outbox inside the aggregate). Any process may then apply them;
each one is idempotent (deterministic ids, conditional writes), so applying twice changes nothing.
"""

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from pymongo.errors import DuplicateKeyError, WriteError

from fltraining.clock import utcnow
from fltraining.documents import Event, Metric, Model, Notification, SetAsideEffect, SwagStatistic, Training, Update
from fltraining.storage.blobs import StoredFile

log = logging.getLogger(__name__)

DropFile = Callable[[UUID], Awaitable[object]]
# Scores a global model on a held-out data set ({"server_accuracy": …}); EvaluationFailed says why it cannot.
Evaluate = Callable[[dict[str, Any]], Awaitable[dict[str, float]]]
# Metric ids of server-side evaluations derive from the effect: a repeated application finds its twin.
EVALUATION_METRICS = UUID("6f1c1b52-3c1e-4b59-9a57-0f7d3c2a9e41")


class EvaluationFailed(Exception):
    """The global model could not be evaluated (data set deleted, shapes that do not fit); recorded, not retried."""


def effect_id(at: datetime, index: int) -> str:
    """An id that sorts by time, then by position within its step."""
    return f"{int(at.timestamp() * 1000):013d}-{index:02d}-{secrets.token_hex(4)}"


class Effects:
    """The effects of one step, in order, stamped with the step's time."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.items: list[dict[str, Any]] = []

    def _add(self, kind: str, **fields: Any) -> None:
        self.items.append({"id": effect_id(self.at, len(self.items)), "kind": kind, "at": self.at, **fields})

    def event(self, type_: str, round_: int, user: UUID | None = None, **data: Any) -> None:
        """Append an entry to the training's audit trail."""
        self._add("event", type=type_, round=round_, user=user, data=data)

    def notify(
        self, type_: str, users: list[UUID], body: dict[str, Any], round_notification: bool,
        per_user: dict[UUID, dict[str, Any]] | None = None,
    ) -> None:
        """Queue one notification per user (`per_user` overrides body fields for some users)."""
        messages = [{"user": user, "body": {**body, **(per_user or {}).get(user, {})}} for user in dict.fromkeys(users)]
        if messages:
            self._add("notify", type=type_, round_notification=round_notification, messages=messages)

    def sync_model(self, model: UUID, round_: int, stored: StoredFile | None) -> None:
        """Point the global model at its new round (and new weights, when aggregated)."""
        file = None if stored is None else {"file_id": stored.file_id, "size": stored.size, "sha256": stored.sha256}
        self._add("sync_model", model=model, round=round_, file=file,
                  file_ids=[] if stored is None else [stored.file_id])

    def drop_file(self, file_id: UUID) -> None:
        """Delete a file once nothing names it (the weights a new round replaced)."""
        self._add("drop_file", file_id=file_id)

    def store_moments(self, model: UUID, first: StoredFile, second: StoredFile) -> None:
        """Attach aggregated SWAG moments to the global model."""
        self._add("moments", model=model, first=first.file_id, second=second.file_id,
                  file_ids=[first.file_id, second.file_id])

    def evaluate(self, model: UUID, round_: int, stored: StoredFile, dataset: UUID) -> None:
        """Score the new global model on the training's held-out data set (its file kept until then)."""
        self._add("evaluate", model=model, round=round_, file_id=stored.file_id, dataset=dataset,
                  file_ids=[stored.file_id])

    def drop_local_files(self, before_round: int) -> None:
        """Delete the training's updates and SWAG statistics of rounds before `before_round`."""
        self._add("drop_local", before_round=before_round)


async def apply_effect(
    effect: dict[str, Any], training: Training, drop_file: DropFile, evaluate: Evaluate | None = None
) -> None:
    """Apply one effect; safe to repeat."""
    kind = effect["kind"]
    if kind == "event":
        await _insert_once(Event.get_pymongo_collection(), {
            "_id": effect["id"], "training": training.id, "type": effect["type"], "round": effect["round"],
            "at": effect["at"], "user": effect["user"], "data": effect["data"],
        })
    elif kind == "notify":
        for message in effect["messages"]:
            await _insert_once(Notification.get_pymongo_collection(), {
                "_id": f"{effect['id']}:{message['user']}", "training": training.id, "user": message["user"],
                "notification_type": effect["type"], "body": message["body"],
                "round_notification": effect["round_notification"], "status": "pending", "attempts": 0,
                "next_attempt_at": effect["at"], "last_error": None, "created_at": effect["at"],
                "finished_at": None,
            })
    elif kind == "sync_model":
        update: dict[str, Any] = {"round": effect["round"]}
        if effect["file"] is not None:
            update |= effect["file"]
        await Model.get_pymongo_collection().update_one(
            {"_id": effect["model"], "round": {"$lte": effect["round"]}}, {"$set": update}
        )
    elif kind == "drop_file":
        await drop_file(effect["file_id"])
    elif kind == "moments":
        before = await Model.get_pymongo_collection().find_one_and_update(
            {"_id": effect["model"]},
            {"$set": {"swag_first_file_id": effect["first"], "swag_second_file_id": effect["second"]}},
        )
        for old in (before or {}).get("swag_first_file_id"), (before or {}).get("swag_second_file_id"):
            if old is not None and old not in (effect["first"], effect["second"]):
                await drop_file(old)
    elif kind == "drop_local":
        await drop_local_files(training.id, {"$lt": effect["before_round"]}, drop_file)
    elif kind == "evaluate" and evaluate is not None:
        await _record_evaluation(effect, training, evaluate)


async def _record_evaluation(effect: dict[str, Any], training: Training, evaluate: Evaluate) -> None:
    """Store the scores as metrics of the global model (reporter null, step = round) and an event."""
    try:
        scores = await evaluate(effect)
    except EvaluationFailed as error:
        await _insert_once(Event.get_pymongo_collection(), {
            "_id": effect["id"], "training": training.id, "type": "evaluation_failed", "round": effect["round"],
            "at": utcnow(), "user": None, "data": {"reason": str(error)[:1000]},
        })
        return
    for key, value in scores.items():
        metric = Metric(id=uuid5(EVALUATION_METRICS, f"{effect['id']}:{key}"), model=effect["model"],
                        training=training.id, step=effect["round"], reporter=None, key=key, value=value)
        await _insert_once(Metric.get_pymongo_collection(), metric.model_dump(by_alias=True))
    await _insert_once(Event.get_pymongo_collection(), {
        "_id": effect["id"], "training": training.id, "type": "evaluated", "round": effect["round"],
        "at": utcnow(), "user": None, "data": {**scores, "dataset": str(effect["dataset"])},
    })


async def drop_local_files(training_id: UUID, rounds: Any, drop_file: DropFile) -> None:
    """Delete a training's updates and SWAG statistics of the given rounds, with their files."""
    for document, fields in ((Update, ("file_id",)), (SwagStatistic, ("first_file_id", "second_file_id"))):
        collection = document.get_pymongo_collection()
        async for raw in collection.find({"training": training_id, "round": rounds}):
            if await collection.find_one_and_delete({"_id": raw["_id"]}):
                for name in fields:
                    await drop_file(raw[name])


async def _insert_once(collection: Any, document: dict[str, Any]) -> None:
    try:
        await collection.insert_one(document)
    except DuplicateKeyError:
        pass  # applied before, by this process or another


# Deleting files is slow on some stores, and evaluating a model takes time; these effects run in their
# own lane, so the next step of a training (which never depends on them) does not wait for them. In that
# lane an evaluation comes before the deletion of the file it evaluates (the next round's drop_file).
CLEANUP_KINDS = frozenset({"drop_file", "drop_local", "evaluate"})


def pending(training: Training, cleanup: bool) -> list[dict[str, Any]]:
    """The training's pending effects of one lane, in order."""
    return [effect for effect in training.effects if (effect["kind"] in CLEANUP_KINDS) == cleanup]


async def apply_pending(
    training: Training, drop_file: DropFile, notified: Callable[[], None], cleanup: bool = False,
    evaluate: Evaluate | None = None,
) -> None:
    """Apply a training's pending effects of one lane in order, then remove them from the document.

    `notified` is called as soon as notifications are in the outbox, so delivery starts at once. An
    effect the store refuses for good (a validator, a malformed effect) is logged once and set aside,
    so it neither blocks the effects behind it nor is retried forever; lost connections still raise.
    """
    effects = pending(training, cleanup)
    if not effects:
        return
    for effect in effects:
        try:
            await apply_effect(effect, training, drop_file, evaluate)
        except (WriteError, KeyError, TypeError, ValueError) as error:
            await set_aside(effect, training, error)
            continue
        if effect["kind"] == "notify":
            notified()
    ids = [effect["id"] for effect in effects]
    await Training.get_pymongo_collection().update_one(
        {"_id": training.id}, {"$pull": {"effects": {"id": {"$in": ids}}}}
    )


async def set_aside(effect: dict[str, Any], training: Training, error: Exception) -> None:
    """Keep an effect that can never be applied in `set_aside_effects`, with why (logged once per effect)."""
    reason = f"{type(error).__name__}: {error}"[:1000]
    try:
        await SetAsideEffect.get_pymongo_collection().insert_one(
            {"_id": effect["id"], "training": training.id, "effect": effect, "error": reason, "at": utcnow()})
    except DuplicateKeyError:
        return  # another process set it aside (and logged it) already
    log.error("effect %s (%s) of training %s set aside: %s", effect["id"], effect.get("kind"), training.id, reason)
