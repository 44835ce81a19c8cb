"""Contributions of round participants: local updates, test metrics and SWAG statistics.

Each is stored first (a unique index allows one per participant and round) and then counted by
one conditional `$addToSet` on the training that only matches while the training waits for it;
an identical retry finds its stored twin and answers as the first attempt did.
"""

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pymongo.errors import DuplicateKeyError

from fltraining.documents import Metric, Model, SwagStatistic, Training, Update, User
from fltraining.engine import plans
from fltraining.engine.rounds import RoundEngine
from fltraining.errors import Conflict, FLTrainingError, InvalidInput, NotFound, PermissionDenied
from fltraining.services.models import ModelService, Upload
from fltraining.states import Phase, TrainingState
from fltraining.storage.queries import find_document
from fltraining.weights.inspect import check_facts
from fltraining.weights.signature import from_documents

MAX_METRICS = 100


@dataclass(frozen=True)
class Target:
    """What a model id in a contribution's path names: the training and its global model."""

    training: Training
    model: Model


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


class ContributionService:
    """Accepts the uploads that drive a round forward."""

    def __init__(self, models: ModelService, engine: RoundEngine) -> None:
        self._models = models
        self._files = models.files
        self._engine = engine

    async def resolve(self, model_id: UUID) -> Target:
        """The training a global model or a local update belongs to (404 for neither)."""
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
        return Target(training, model)

    def _check_waiting(self, training: Training, user: User, state: TrainingState, phase: Phase, round_: int) -> None:
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

    def _check_file(self, stored: Upload, model: Model, field: str) -> None:
        # What the upload was found to be when it was staged: the stored bytes are never read back.
        check_facts(stored.facts, from_documents([t.model_dump() for t in model.tensors]), field)

    async def _count(self, training: Training, user: User, state: TrainingState, phase: Phase, event: str,
                     **data: Any) -> None:
        """Count the contribution in the training (once), then let the engine look at the round."""
        effects = plans.new_effects()
        effects.event(event, training.round, user.id, **data)
        condition = {"state": str(state), "phase": str(phase), "round": training.round,
                     "round_participants": user.id, "round_arrived": {"$ne": user.id}}
        written = await plans.write_step(training, condition, {}, effects, {"$addToSet": {"round_arrived": user.id}})
        if written is None:
            current = await find_document(Training, {"_id": training.id})
            if current is None:
                raise NotFound(f"Training {training.id} not found.")
            self._check_waiting(current, user, state, phase, training.round)
            if user.id not in current.round_arrived:
                raise Conflict("The training changed while the upload was counted; send it again.")
        # The engine applies the event and looks at the round in the background: the answer does
        # not wait for effects (some, like deleting a finished round's files, take a while).
        self._engine.kick(training.id)

    async def accept_update(
        self, user: User, model_id: UUID, round_: int, sample_size: int, stored: Upload,
        metrics: tuple[list[str], list[float]],
    ) -> None:
        """POST /api/models/{id}/: a participant's local model for the current round."""
        check_metrics(*metrics)
        target = await self.resolve(model_id)
        training = target.training
        self._check_waiting(training, user, TrainingState.ONGOING, Phase.UPDATES, round_)
        self._check_file(stored, target.model, "model_file")
        update = Update(training=training.id, model=target.model.id, round=round_, user=user.id,
                        sample_size=sample_size, file_id=stored.file_id, size=stored.size, sha256=stored.sha256)
        fresh = True
        try:
            await update.insert()
        except DuplicateKeyError:
            fresh = False
            await self._files.delete(stored.file_id)
            existing = await find_document(Update, {"training": training.id, "round": round_, "user": user.id})
            if existing is None or (existing.sha256, existing.sample_size) != (stored.sha256, sample_size):
                raise Conflict(f"You already sent a different update for round {round_}.") from None
            update = existing
        try:
            names, values = metrics
            if names:
                await self._store_metrics(update.id, training.id, update.round, user, names, values)
            await self._count(training, user, TrainingState.ONGOING, Phase.UPDATES, "update_accepted",
                              update=str(update.id), sample_size=sample_size)
        except FLTrainingError:
            if fresh:  # refused after all: nothing of it stays
                await Update.get_pymongo_collection().delete_one({"_id": update.id})
                await self._models.drop_unshared_file(update.file_id)
            raise

    async def accept_swag(
        self, user: User, model_id: UUID, round_: int, sample_size: int, first: Upload, second: Upload
    ) -> None:
        """POST /api/models/{id}/swag/: a participant's SWAG moments in state S."""
        target = await self.resolve(model_id)
        training = target.training
        self._check_waiting(training, user, TrainingState.SWAG_ROUND, Phase.SWAG, round_)
        self._check_file(first, target.model, "first_moment_file")
        self._check_file(second, target.model, "second_moment_file")
        digest = hashlib.sha256(f"{first.sha256}:{second.sha256}".encode()).hexdigest()
        stat = SwagStatistic(training=training.id, model=target.model.id, round=round_, user=user.id,
                             sample_size=sample_size, first_file_id=first.file_id, second_file_id=second.file_id,
                             sha256=digest)
        fresh = True
        try:
            await stat.insert()
        except DuplicateKeyError:
            fresh = False
            await self._files.delete(first.file_id)
            await self._files.delete(second.file_id)
            existing = await find_document(SwagStatistic, {"training": training.id, "round": round_, "user": user.id})
            if existing is None or (existing.sha256, existing.sample_size) != (digest, sample_size):
                raise Conflict(f"You already sent different SWAG statistics for round {round_}.") from None
        try:
            await self._count(training, user, TrainingState.SWAG_ROUND, Phase.SWAG, "swag_statistics_accepted",
                              sample_size=sample_size)
        except FLTrainingError:
            if fresh:  # refused after all: nothing of it stays
                await SwagStatistic.get_pymongo_collection().delete_one({"_id": stat.id})
                await self._models.drop_unshared_file(first.file_id)
                await self._models.drop_unshared_file(second.file_id)
            raise

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
                await self._count(training, user, TrainingState.ONGOING, Phase.TESTING, "test_metrics_accepted",
                                  metrics=[{"key": name, "value": value} for name, value in zip(names, values)])
            except Conflict:
                pass  # the test phase ended meanwhile; the metrics are stored all the same
        return model.id

    async def _store_metrics(
        self, model_id: UUID, training_id: UUID | None, step: int, user: User, names: list[str], values: list[float]
    ) -> None:
        """Store checked metric values once; resending the same values is fine, changing one is a conflict (409)."""
        collection = Metric.get_pymongo_collection()
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


async def visible_file(models: ModelService, user: User, model_id: UUID) -> FileRef:
    """The bytes of a global model the user reaches, or of a local update the user sent or reaches."""
    try:
        model = await models.get_accessible(user, model_id)
        return FileRef(model.file_id, model.size, model.sha256)
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
