"""Effects: what a step of the engine causes besides its own update.

A step writes its effects into the training document in the same conditional update as the
state it changes (a transactional outbox inside the aggregate). Any process may then apply them;
each one is idempotent (deterministic ids, conditional writes), so applying twice changes nothing.
"""

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID, uuid5

from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from fltraining.clock import utcnow
from fltraining.documents import (
    Event,
    Metric,
    Model,
    Notification,
    SetAsideEffect,
    SwagStatistic,
    Training,
    Update,
)
from fltraining.states import UncertaintyMethod
from fltraining.storage.blobs import StoredFile

log = logging.getLogger(__name__)

DropFile = Callable[[UUID], Awaitable[object]]
DropFiles = Callable[[list[UUID]], Awaitable[object]]
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
        # Not stored: the files of the updates a `drop_local` effect deletes, by effect id, where the step knew them.
        self.local_files: dict[str, list[UUID]] = {}

    def _add(self, kind: str, **fields: Any) -> None:
        self.items.append({"id": effect_id(self.at, len(self.items)), "kind": kind, "at": self.at, **fields})

    def event(self, type_: str, round_: int, user: UUID | None = None, **data: Any) -> None:
        """Append an entry to the training's audit trail."""
        self._add("event", type=type_, round=round_, user=user, data=data)

    def notify(
        self, type_: str, users: list[UUID], body: dict[str, Any], round_notification: bool,
        per_user: dict[UUID, dict[str, Any]] | None = None,
    ) -> None:
        """Queue one notification to a set of users (`per_user` overrides body fields for some of them)."""
        receivers = list(dict.fromkeys(users))
        if receivers:
            addressed = [{"user": user, "body": fields} for user, fields in (per_user or {}).items()
                         if user in set(receivers)]
            self._add("notify", type=type_, round_notification=round_notification, receivers=receivers,
                      body=body, addressed=addressed)

    def sync_model(self, model: UUID, round_: int, stored: StoredFile | None,
                   optimizer: tuple[StoredFile, StoredFile, int] | None = None) -> None:
        """Point the global model at its new round (and new weights, when aggregated, with the server
        optimizer's new m, v and step count, when it has one)."""
        file: dict[str, Any] | None = None
        file_ids = []
        if stored is not None:
            file = {"file_id": stored.file_id, "size": stored.size, "sha256": stored.sha256}
            file_ids.append(stored.file_id)
        if file is not None and optimizer is not None:
            m, v, steps = optimizer
            file |= {"optimizer_m_file_id": m.file_id, "optimizer_v_file_id": v.file_id, "optimizer_steps": steps}
            file_ids += [m.file_id, v.file_id]
        self._add("sync_model", model=model, round=round_, file=file, file_ids=file_ids)

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

    def drop_local_files(self, before_round: int, known_files: list[UUID] | None = None) -> None:
        """Delete the training's updates and SWAG statistics of rounds before `before_round` (`known_files`: the
        files of all those updates, when the step knows them, so that this process need not read them)."""
        self._add("drop_local", before_round=before_round)
        if known_files is not None:
            self.local_files[self.items[-1]["id"]] = known_files


class Outbox(Protocol):
    """The process's notification delivery, as effects hand it new outbox records."""

    def claim(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record marked as this process's to deliver (written so, no other process takes it meanwhile)."""
        ...

    def take(self, record: dict[str, Any]) -> None:
        """Deliver a record just written (claimed by `claim`) from memory."""
        ...


class LaterOutbox:
    """An outbox that leaves new records to whichever delivery finds them due."""

    def claim(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as it is: due at once, claimed by no one."""
        return record

    def take(self, record: dict[str, Any]) -> None:
        """Nothing: the record is due and found by the next scan."""


class AppliedEffects:
    """The ids of the effects this process applied, the newest `limit` of them.

    A training read after a step may still list effects whose removal this process has not yet made
    (the clean-up of one round, which removes the step's effects of both lanes, runs beside the next
    round's commit); they are skipped rather than applied again (reads per file drop, a scan of the
    round's updates), and an id is forgotten when its application or removal failed. Applying twice
    would still be correct: every effect is safe to repeat, and another process that reads them applies them.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._ids: dict[str, None] = {}
        self._limit = limit

    def __contains__(self, effect_id: object) -> bool:
        return effect_id in self._ids

    def add(self, effect_id: str) -> None:
        """Remember one applied effect (forgetting the oldest beyond the limit)."""
        self._ids[effect_id] = None
        if len(self._ids) > self._limit:
            del self._ids[next(iter(self._ids))]

    def forget(self, effect_ids: list[str]) -> None:
        """Forget effects not applied or not removed after all: the next look applies them again, then removes them."""
        for effect_id in effect_ids:
            self._ids.pop(effect_id, None)


@dataclass(frozen=True)
class Effectors:
    """What applying effects needs from the process: file deletion, the outbox and server-side evaluation."""

    drop_file: DropFile  # a model's file, which a clone may share: deleted once no model or pending effect names it
    drop_files: DropFiles  # files never shared (updates, SWAG statistics): deleted as they are
    outbox: Outbox
    evaluate: Evaluate | None = None
    # Told the global model's file of a new round as it is written, so this process serves it from memory.
    synced: Callable[[UUID, int, StoredFile], None] = lambda model, round_, stored: None
    applied: AppliedEffects = field(default_factory=AppliedEffects)
    # The files of the updates a `drop_local` effect deletes, by effect id, where the step that wrote it knew them.
    local_files: dict[str, list[UUID]] = field(default_factory=dict)


async def apply_effect(effect: dict[str, Any], training: Training, effectors: Effectors) -> None:
    """Apply one effect; safe to repeat."""
    drop_file = effectors.drop_file
    kind = effect["kind"]
    if kind == "event":
        await _insert_once(Event.get_pymongo_collection(), event_document(effect, training))
    elif kind == "notify":
        record = effectors.outbox.claim(fan_out(effect, training.id))
        if await _insert_once(Notification.get_pymongo_collection(), record):
            effectors.outbox.take(record)
    elif kind == "sync_model":
        update: dict[str, Any] = {"round": effect["round"]}
        if effect["file"] is not None:
            update |= effect["file"]
        await Model.get_pymongo_collection().update_one(
            {"_id": effect["model"], "round": {"$lte": effect["round"]}}, {"$set": update}
        )
        if effect["file"] is not None:
            file = effect["file"]
            effectors.synced(effect["model"], effect["round"], StoredFile(file["file_id"], file["size"], file["sha256"]))
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
        swag = training.uncertainty_method == UncertaintyMethod.SWAG
        known = effectors.local_files.pop(effect["id"], None)
        if known is not None and not swag:
            await drop_known_local_files(training.id, {"$lt": effect["before_round"]}, known, effectors.drop_files)
        else:
            await drop_local_files(training.id, {"$lt": effect["before_round"]}, effectors.drop_files, swag=swag)
    elif kind == "evaluate" and effectors.evaluate is not None:
        await _record_evaluation(effect, training, effectors.evaluate)


def event_document(effect: dict[str, Any], training: Training) -> dict[str, Any]:
    """The events collection's document of an `event` effect (its id is the effect's: written once)."""
    return {"_id": effect["id"], "training": training.id, "type": effect["type"], "round": effect["round"],
            "at": effect["at"], "user": effect["user"], "data": effect["data"]}


def fan_out(effect: dict[str, Any], training_id: UUID) -> dict[str, Any]:
    """The outbox record of a `notify` effect: one document for all its receivers, due at once."""
    if "messages" in effect:  # queued before fan-outs: one whole body per receiver
        effect = {**effect, "receivers": [message["user"] for message in effect["messages"]], "body": {},
                  "addressed": effect["messages"]}
    return {
        "_id": effect["id"], "training": training_id, "notification_type": effect["type"], "body": effect["body"],
        "addressed": effect["addressed"], "round_notification": effect["round_notification"],
        "receivers": effect["receivers"], "pending": effect["receivers"], "receipts": [], "delivered": 0,
        "status": "pending", "next_attempt_at": effect["at"], "claimed_by": None, "created_at": effect["at"],
        "settled_at": None, "expires_at": None,
    }


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


# The per-participant records of a round and the files each names.
RECORDS: list[tuple[type[Update] | type[SwagStatistic], tuple[str, ...]]] = [
    (Update, ("file_id",)), (SwagStatistic, ("first_file_id", "second_file_id"))]


async def drop_local_files(training_id: UUID, rounds: Any, drop_files: DropFiles, swag: bool = True) -> None:
    """Delete a training's updates and SWAG statistics of the given rounds, then their files, in bulk.

    Their files are never shared (each upload stores its own), so no "is it still named" check per file;
    a crash between the two leaves files no document names, which the sweeper removes. Only SWAG trainings
    have SWAG statistics (`swag=False` spares the read of that collection for the others).
    """
    for document, fields in RECORDS if swag else RECORDS[:1]:
        collection = document.get_pymongo_collection()
        query = {"training": training_id, "round": rounds}
        file_ids = [raw[name] async for raw in collection.find(query, dict.fromkeys(fields, 1)) for name in fields]
        if file_ids:
            await collection.delete_many(query)
            await drop_files(file_ids)


async def drop_known_local_files(training_id: UUID, rounds: Any, file_ids: list[UUID], drop_files: DropFiles) -> None:
    """Delete a training's updates of the given rounds, whose files the caller knows, in bulk (no read of them).

    A stored update whose file is not among them (an upload of a participant removed during its round) leaves
    a file no document names once deleted, which the sweeper removes.
    """
    await Update.get_pymongo_collection().delete_many({"training": training_id, "round": rounds})
    if file_ids:
        await drop_files(file_ids)


async def _insert_once(collection: Any, document: dict[str, Any]) -> bool:
    try:
        await collection.insert_one(document)
    except DuplicateKeyError:
        return False  # applied before, by this process or another
    return True


# Deleting files is slow on some stores, and evaluating a model takes time; these effects run in their
# own lane, so the next step of a training (which never depends on them) does not wait for them. In that
# lane an evaluation comes before the deletion of the file it evaluates (the next round's drop_file).
CLEANUP_KINDS = frozenset({"drop_file", "drop_local", "evaluate"})


def pending(training: Training, cleanup: bool) -> list[dict[str, Any]]:
    """The training's pending effects of one lane, in order."""
    return [effect for effect in training.effects if (effect["kind"] in CLEANUP_KINDS) == cleanup]


async def apply_pending(training: Training, effectors: Effectors, cleanup: bool = False,
                        remove: bool = True) -> list[str]:
    """Apply a training's pending effects of one lane (in order, its events together at the end) and remove them
    from the document (`remove=False`: the caller removes them together with others); the lane's effect ids.

    Effects this process applied already are skipped: their removal was made, or is under way, here. A
    notification is handed to the outbox as soon as its record is written, so delivery starts at once.
    An effect the store refuses for good (a validator, a malformed effect) is logged once and set aside,
    so it neither blocks the effects behind it nor is retried forever; lost connections still raise.
    """
    effects = [effect for effect in pending(training, cleanup) if effect["id"] not in effectors.applied]
    if not effects:
        return []
    ids = [effect["id"] for effect in effects]
    events: list[dict[str, Any]] = []
    try:
        for effect in effects:
            if effect["kind"] == "event":
                events.append(effect)
                continue
            await _apply_one(effect, training, effectors)
        # The step's events last, with one write: no other effect depends on an event, and the notifications
        # above need not wait for them (an aggregation's event lists every arrival).
        await _insert_events(events, training, effectors)
    except BaseException:
        effectors.applied.forget(ids)  # applied again at the next look, then removed
        raise
    if remove:
        await remove_applied(training, ids, effectors, alone=len(ids) == len(training.effects))
    return ids


async def remove_applied(training: Training, ids: list[str], effectors: Effectors, alone: bool) -> None:
    """Remove applied effects from the training: when they are likely all it lists (`alone`), with one update that
    also clears the pending marker if that holds; otherwise pulled. A failure forgets them as applied."""
    collection = Training.get_pymongo_collection()
    try:
        if alone:
            # Exactly these effects (ids are unique): no step pushed others since.
            emptied = await collection.update_one(
                {"_id": training.id, "effects": {"$size": len(ids)}, "effects.id": {"$all": ids}},
                {"$set": {"effects": [], "effects_pending": False}})
            if emptied.matched_count:
                return
        await collection.update_one({"_id": training.id}, {"$pull": {"effects": {"id": {"$in": ids}}}})
    except BaseException:
        effectors.applied.forget(ids)
        raise


DUPLICATE_KEY = 11000


async def _apply_one(effect: dict[str, Any], training: Training, effectors: Effectors) -> None:
    """Apply one effect and remember it applied; one the store refuses for good is set aside."""
    try:
        await apply_effect(effect, training, effectors)
    except (WriteError, KeyError, TypeError, ValueError) as error:
        await set_aside(effect, training, error)
    effectors.applied.add(effect["id"])


async def _insert_events(effects: list[dict[str, Any]], training: Training, effectors: Effectors) -> None:
    """Append a step's `event` effects to the events collection with one write; an event stored before (by
    this process or another) stays as it is, and one the store refuses for good is set aside."""
    if not effects:
        return
    refused: dict[int, str] = {}
    try:
        await Event.get_pymongo_collection().insert_many([event_document(effect, training) for effect in effects],
                                                         ordered=False)
    except BulkWriteError as error:
        refused = {failure["index"]: failure.get("errmsg", "") for failure in error.details.get("writeErrors", [])
                   if failure.get("code") != DUPLICATE_KEY}
    except (KeyError, TypeError, ValueError):  # a malformed effect: each is tried on its own
        for effect in effects:
            await _apply_one(effect, training, effectors)
        return
    for index, effect in enumerate(effects):
        if index in refused:
            await set_aside(effect, training, WriteError(refused[index]))
        effectors.applied.add(effect["id"])


async def set_aside(effect: dict[str, Any], training: Training, error: Exception) -> None:
    """Keep an effect that can never be applied in `set_aside_effects`, with why (logged once per effect)."""
    reason = f"{type(error).__name__}: {error}"[:1000]
    try:
        await SetAsideEffect.get_pymongo_collection().insert_one(
            {"_id": effect["id"], "training": training.id, "effect": effect, "error": reason, "at": utcnow()})
    except DuplicateKeyError:
        return  # another process set it aside (and logged it) already
    log.error("effect %s (%s) of training %s set aside: %s", effect["id"], effect.get("kind"), training.id, reason)
