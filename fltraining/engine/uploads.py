"""Contributions of round participants: local updates, test metrics and SWAG statistics.

A local update or SWAG statistic is stored first (a unique index allows one per participant and
round; that document is the record of arrival) and confirmed with one `count` of the training in
the waiting state; test metrics are counted by a conditional `$addToSet` on the training. An
identical retry finds its stored twin and answers as the first attempt did.
"""

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pymongo.errors import DuplicateKeyError

from fltraining.documents import Metric, Model, SwagStatistic, Training, Update, User
from fltraining.engine import plans
from fltraining.engine.rounds import RoundEngine
from fltraining.errors import Conflict, FLTrainingError, InvalidInput, NotFound, PermissionDenied
from fltraining.states import Phase, TrainingState
from fltraining.storage.facts import ImmutableFacts
from fltraining.storage.model_store import ModelStore, Upload
from fltraining.storage.queries import count_matching, find_document
from fltraining.weights.inspect import check_facts
from fltraining.weights.signature import Signature, from_documents

MAX_METRICS = 100


@dataclass(frozen=True)
class Target:
    """What a model id in a contribution's path names: the training, its global model and that model's signature."""

    training_id: UUID
    model_id: UUID
    signature: Signature


def check_metrics(names: Sequence[str], values: Sequence[float]) -> None:
    """Metric names and values pair up, are bounded and finite (400 otherwise)."""
    if len(names) != len(values):
        raise InvalidInput("Metric names and values must have the same length")
    if len(names) > MAX_METRICS:
        raise InvalidInput(f"At most {MAX_METRICS} metrics per request.")
    if len(set(names)) != len(names):
        raise InvalidInput("Each metric name may appear once per request.")
    for name, value in zip(names, values):
        if not 1 <= len(name) <= 64:
            raise InvalidInput("Metric names must be 1 to 64 characters long.")
        if not math.isfinite(value):
            raise InvalidInput(f"Metric {name!r} is not a finite number.")


def check_waiting(training: Training, user: User, state: TrainingState, phase: Phase, round_: int) -> None:
    """The training waits for this user's contribution to `phase` of `round_` (403 or 409 saying why not)."""
    if user.id not in training.participants:
        raise PermissionDenied(f"You are not a participant of training {training.id}!")
    if training.state != state:
        raise Conflict(f"Training with ID {training.id} is in state {training.state}")
    if training.phase != phase:
        raise Conflict(f"Training with ID {training.id} is not waiting for {phase} (phase {training.phase}).")
    if training.round != round_:
        raise Conflict(f"Training with ID {training.id} is not currently in round {round_}")
    if user.id not in training.round_participants:
        raise Conflict(f"You joined training {training.id} during round {training.round}; "
                       "you take part from the next round on.")


def waiting_filter(training_id: UUID, user: User, state: TrainingState, phase: Phase, round_: int) -> dict[str, Any]:
    """The filter a training matches while it waits for this user's contribution (what `check_waiting` checks)."""
    return {"_id": training_id, "state": str(state), "phase": str(phase), "round": round_,
            "participants": user.id, "round_participants": user.id}


class StaleTarget(Exception):
    """A remembered model → training link whose training is gone: look the model up again."""


class ContributionService:
    """Accepts the uploads that drive a round forward.

    A local update or SWAG statistic is inserted first (the unique index makes it the record of
    arrival) and then confirmed with one `count` of the training in the waiting state: an answered
    201 means the round was still open after the insert, so the aggregation, which claims the round
    before it reads the round's documents, finds it. A refused upload is removed again.
    """

    def __init__(self, models: ModelStore, engine: RoundEngine, facts: ImmutableFacts) -> None:
        self._models = models
        self._files = models.files
        self._engine = engine
        self._facts = facts

    async def resolve(self, model_id: UUID) -> Target:
        """The training a global model or a local update belongs to (404 for neither)."""
        known = self._facts.target(model_id)
        if known is not None and (signature := self._facts.signature(known[1])) is not None:
            return Target(known[0], known[1], signature)
        model = await find_document(Model, {"_id": model_id})
        if model is None:
            local = await find_document(Update, {"_id": model_id})
            if local is None:
                raise NotFound(f"Model {model_id} not found.")
            training = await find_document(Training, {"_id": local.training})
        else:
            training = await find_document(Training, {"model": model.id})
        if training is None:
            raise NotFound(f"Model with ID {model_id} does not have a training process running")
        if model is None:
            model = await find_document(Model, {"_id": training.model})
            if model is None:
                raise NotFound(f"Model {training.model} not found.")
        signature = from_documents([t.model_dump() for t in model.tensors])
        if model.format is not None:  # described: its signature is final
            self._facts.remember_target(model_id, training.id, model.id)
            self._facts.remember_signature(model.id, signature)
        return Target(training.id, model.id, signature)

    async def _refusal(self, training_id: UUID, user: User, state: TrainingState, phase: Phase,
                       round_: int) -> FLTrainingError:
        """Why a training does not take this contribution now (read on the refusal path only)."""
        current = await find_document(Training, {"_id": training_id})
        if current is None:
            raise StaleTarget()
        try:
            check_waiting(current, user, state, phase, round_)
        except FLTrainingError as error:
            return error
        return Conflict("The training changed while the upload was counted; send it again.")

    async def _confirm(self, target: Target, user: User, state: TrainingState, phase: Phase, round_: int) -> None:
        """One `count`: the training still waits for this user's contribution (raises why not otherwise)."""
        query = waiting_filter(target.training_id, user, state, phase, round_)
        if not await count_matching(Training.get_pymongo_collection(), query):
            raise await self._refusal(target.training_id, user, state, phase, round_)

    async def _accept[D: (Update, SwagStatistic)](
        self, user: User, model_id: UUID, round_: int, state: TrainingState, phase: Phase,
        make: Callable[[Target], D], same: Callable[[D, D], bool], files: Callable[[D], list[UUID]],
        conflict: str, after: Callable[[D, bool], Awaitable[None]] | None = None,
    ) -> None:
        """Insert a contribution, confirm it against the training, and wake the engine if it completes the round."""
        for attempt in range(2):
            target = await self.resolve(model_id)
            document = make(target)
            fresh = True
            try:
                await document.insert()
            except DuplicateKeyError:
                fresh = False
                for file_id in files(document):
                    await self._files.delete(file_id)
                query = {"training": target.training_id, "round": round_, "user": user.id}
                existing = await find_document(type(document), query)
                if existing is None or not same(existing, document):
                    raise Conflict(conflict) from None
                document = existing
            try:
                await self._confirm(target, user, state, phase, round_)
                if after is not None:
                    await after(document, fresh)
            except (FLTrainingError, StaleTarget) as error:
                if fresh:
                    await self._withdraw(document, files(document))
                if isinstance(error, StaleTarget) and attempt == 0:
                    self._facts.forget_target(model_id)
                    continue
                if isinstance(error, StaleTarget):
                    raise NotFound(f"Model with ID {model_id} does not have a training process running") from None
                raise
            self._engine.bell.ring(target.training_id)
            await self._engine.completion.arrived(target.training_id, phase, round_, fresh)
            return

    async def _withdraw(self, document: Update | SwagStatistic, files: list[UUID]) -> None:
        """Remove a refused contribution, unless the round was closed meanwhile and its aggregation may use it."""
        raw = await Training.get_pymongo_collection().find_one(
            {"_id": document.training, "round": document.round, "phase": str(Phase.AGGREGATING)}, {"_id": 1})
        if raw is not None:
            return  # the round's clean-up removes it with the others
        await type(document).get_pymongo_collection().delete_one({"_id": document.id})
        for file_id in files:
            await self._models.drop_unshared_file(file_id)

    async def accept_update(
        self, user: User, model_id: UUID, round_: int, sample_size: int, stored: Upload,
        metrics: tuple[list[str], list[float]],
    ) -> None:
        """POST /api/models/{id}/: a participant's local model for the current round."""
        check_metrics(*metrics)
        names, values = metrics

        def make(target: Target) -> Update:
            check_facts(stored.facts, target.signature, "model_file")
            return Update(training=target.training_id, model=target.model_id, round=round_, user=user.id,
                          sample_size=sample_size, file_id=stored.file_id, size=stored.size, sha256=stored.sha256)

        async def with_metrics(update: Update, fresh: bool) -> None:
            if names:
                await self._store_metrics(update.id, update.training, update.round, user, names, values, fresh)

        await self._accept(
            user, model_id, round_, TrainingState.ONGOING, Phase.UPDATES, make,
            lambda old, new: (old.sha256, old.sample_size) == (new.sha256, new.sample_size),
            lambda update: [update.file_id], f"You already sent a different update for round {round_}.", with_metrics)

    async def accept_swag(
        self, user: User, model_id: UUID, round_: int, sample_size: int, first: Upload, second: Upload
    ) -> None:
        """POST /api/models/{id}/swag/: a participant's SWAG moments in state S."""
        digest = hashlib.sha256(f"{first.sha256}:{second.sha256}".encode()).hexdigest()

        def make(target: Target) -> SwagStatistic:
            check_facts(first.facts, target.signature, "first_moment_file")
            check_facts(second.facts, target.signature, "second_moment_file")
            return SwagStatistic(training=target.training_id, model=target.model_id, round=round_, user=user.id,
                                 sample_size=sample_size, first_file_id=first.file_id,
                                 second_file_id=second.file_id, sha256=digest)

        await self._accept(
            user, model_id, round_, TrainingState.SWAG_ROUND, Phase.SWAG, make,
            lambda old, new: (old.sha256, old.sample_size) == (new.sha256, new.sample_size),
            lambda stat: [stat.first_file_id, stat.second_file_id],
            f"You already sent different SWAG statistics for round {round_}.")

    async def _count_test(self, training: Training, user: User, **data: Any) -> None:
        """Count a participant's test metrics in the training (once), then let the engine look at the round."""
        effects = plans.new_effects()
        effects.event("test_metrics_accepted", training.round, user.id, **data)
        condition = {"state": str(TrainingState.ONGOING), "phase": str(Phase.TESTING), "round": training.round,
                     "round_participants": user.id, "round_arrived": {"$ne": user.id}}
        written = await plans.write_step(training, condition, {}, effects, {"$addToSet": {"round_arrived": user.id}})
        if written is None:
            current = await find_document(Training, {"_id": training.id})
            if current is None:
                raise NotFound(f"Training {training.id} not found.")
            check_waiting(current, user, TrainingState.ONGOING, Phase.TESTING, training.round)
            if user.id not in current.round_arrived:
                raise Conflict("The training changed while the upload was counted; send it again.")
        self._engine.bell.ring(training.id)
        self._engine.kick(training.id)

    async def accept_metrics(self, user: User, model_id: UUID, names: list[str], values: list[float]) -> UUID:
        """POST /api/models/{id}/metrics/: test metrics of a global model, or metrics of any model one owns."""
        check_metrics(names, values)
        if not names:
            raise InvalidInput("Metric names or values are missing")
        model = await find_document(Model, {"_id": model_id})
        if model is None:
            local = await find_document(Update, {"_id": model_id})
            if local is None:
                raise NotFound(f"Model {model_id} not found.")
            if local.user != user.id:
                raise PermissionDenied()
            await self._store_metrics(local.id, local.training, local.round, user, names, values)
            return local.id
        training = await find_document(Training, {"model": model.id})
        participant = training is not None and user.id in training.participants
        if model.owner != user.id and not participant:
            raise PermissionDenied()
        step = model.round if training is None else training.round
        await self._store_metrics(model.id, None if training is None else training.id, step, user, names, values)
        if (training is not None and participant and training.state == TrainingState.ONGOING
                and training.phase == Phase.TESTING and user.id in training.round_participants
                and user.id not in training.round_arrived):
            try:
                await self._count_test(training, user,
                                       metrics=[{"key": name, "value": value} for name, value in zip(names, values)])
            except Conflict:
                pass  # the test phase ended meanwhile; the metrics are stored all the same
        return model.id

    async def _store_metrics(
        self, model_id: UUID, training_id: UUID | None, step: int, user: User, names: list[str], values: list[float],
        fresh: bool = False,
    ) -> None:
        """Store checked metric values once; resending the same values is fine, changing one is a conflict (409).

        `fresh`: the model was stored by this request, so no value of it can exist yet (one insert, no lookup).
        """
        collection = Metric.get_pymongo_collection()
        if fresh:
            await collection.insert_many([
                Metric(model=model_id, training=training_id, step=step, reporter=user.id, key=name,
                       value=float(value)).model_dump(by_alias=True) for name, value in zip(names, values)])
            return
        query = {"model": model_id, "step": step, "reporter": user.id, "key": {"$in": names}}
        stored = {raw["key"]: raw["value"] async for raw in collection.find(query)}
        for name, value in zip(names, values):
            if name in stored and stored[name] != value:
                raise Conflict(f"Metric {name!r} of step {step} was already reported with another value.")
        for name, value in zip(names, values):
            if name in stored:
                continue
            try:
                await Metric(model=model_id, training=training_id, step=step, reporter=user.id,
                             key=name, value=float(value)).insert()
            except DuplicateKeyError:
                pass  # a concurrent identical retry stored it


async def local_model_visible(user: User, update_id: UUID) -> Update:
    """A stored local update the user sent, or reaches as actor or participant of its training."""
    update = await find_document(Update, {"_id": update_id})
    if update is None:
        raise NotFound(f"Model {update_id} not found.")
    if update.user == user.id:
        return update
    training = await find_document(Training, {"_id": update.training})
    if training is None or (training.actor != user.id and user.id not in training.participants):
        raise PermissionDenied()
    return update


@dataclass(frozen=True)
class FileRef:
    """Where a downloadable model's bytes are."""

    file_id: UUID
    size: int
    sha256: str


async def visible_file(models: ModelStore, user: User, model_id: UUID) -> FileRef:
    """The bytes of a global model the user reaches, or of a local update the user sent or reaches."""
    try:
        stored = await models.current_file(user, model_id)
        return FileRef(stored.file_id, stored.size, stored.sha256)
    except NotFound:
        local = await local_model_visible(user, model_id)
        return FileRef(local.file_id, local.size, local.sha256)


async def metrics_of(model_id: UUID) -> list[dict[str, Any]]:
    """Every metric stored for a model, by step and time."""
    cursor = Metric.get_pymongo_collection().find({"model": model_id}).sort([("step", 1), ("created_at", 1)])
    return [raw async for raw in cursor]


async def training_models(training: Training, latest: bool) -> list[dict[str, Any]]:
    """The global model and the stored local updates (only each participant's newest with `latest`)."""
    raw_model = await Model.get_pymongo_collection().find_one({"_id": training.model})
    entries: list[dict[str, Any]] = []
    if raw_model is not None:
        entries.append({**raw_model, "id": raw_model["_id"], "type": "GLOBAL"})
    cursor = Update.get_pymongo_collection().find({"training": training.id}).sort([("round", -1), ("user", 1)])
    seen: set[UUID] = set()
    async for raw in cursor:
        if latest and raw["user"] in seen:
            continue
        seen.add(raw["user"])
        entries.append({**raw, "id": raw["_id"], "type": "LOCAL", "owner": raw["user"], "base_model": raw["model"]})
    return entries
