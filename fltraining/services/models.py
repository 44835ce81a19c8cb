"""Models: upload, access rules, download, cloning and deletion."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from fltraining.clock import utcnow
from fltraining.documents import Model, TensorDocument, Training, User
from fltraining.engine.effects import drop_local_files
from fltraining.errors import InvalidInput, NotFound, PermissionDenied
from fltraining.schemas.models import ModelCreate
from fltraining.storage.blobs import BlobStore, StoredFile
from fltraining.storage.facts import ImmutableFacts
from fltraining.storage.queries import IN_CHUNK, count_matching, find_document, in_chunks
from fltraining.storage.references import file_in_use, referenced_file_ids
from fltraining.weights.inspect import FileFacts, inspect_file

SWEEP_BATCH = IN_CHUNK  # the batch's ids are asked for with `$in`
SWEEP_MAX_BATCHES = 100  # a bound per sweep; the next sweep goes on where this one stopped


@dataclass(frozen=True)
class Upload(StoredFile):
    """An uploaded file in the blob store, with what its content was found to be."""

    facts: FileFacts


def involving(user: User) -> dict[str, Any]:
    """The filter of trainings a user is actor or participant of."""
    return {"$or": [{"actor": user.id}, {"participants": user.id}]}


def check_reachable(user: User, model: Model, training: Training | None) -> None:
    """The user owns the model or is actor or participant of its (one) training; 403 otherwise."""
    if model.owner != user.id and (
            training is None or (training.actor != user.id and user.id not in training.participants)):
        raise PermissionDenied()


class ModelService:
    """Every model rule; bytes go through the blob store, metadata through the `models` collection."""

    def __init__(self, files: BlobStore, max_model_bytes: int, facts: ImmutableFacts | None = None) -> None:
        self._files = files
        self._max_bytes = max_model_bytes
        self._facts = facts or ImmutableFacts()

    @property
    def facts(self) -> ImmutableFacts:
        """This process's memo of immutable facts (which training a model belongs to, signatures)."""
        return self._facts

    @property
    def files(self) -> BlobStore:
        """The blob store every model, update and statistic file lives in."""
        return self._files

    @property
    def max_bytes(self) -> int:
        """The largest file an upload may store."""
        return self._max_bytes

    async def store_file(self, chunks: AsyncIterator[bytes]) -> Upload:
        """Stream an uploaded file to local staging (413 past the size limit), describe it from there
        (mapped, off the event loop: never read back from the store), refuse it unless it is a model file
        in an accepted format (400), then commit it to the blob store."""
        staged = await self._files.stage(chunks, self._max_bytes)
        try:
            facts = await asyncio.to_thread(inspect_file, staged.path)
            if facts.format is None:  # refused here, before anything is stored (400 naming the accepted formats)
                raise InvalidInput(facts.problem or "Unsupported model file.")
        except BaseException:
            await self._files.discard(staged)
            raise
        stored = await self._files.commit(staged)
        return Upload(stored.file_id, stored.size, stored.sha256, facts)

    async def discard_file(self, stored: StoredFile) -> None:
        """Remove a stored file whose upload was rejected."""
        await self._files.delete(stored.file_id)

    async def inspect(self, file_id: UUID) -> FileFacts:
        """Describe a stored file's format and tensors (off the event loop), for models stored before
        uploads were described."""
        async with self._files.local_copy(file_id) as path:
            return await asyncio.to_thread(inspect_file, path)

    async def described(self, model: Model) -> Model:
        """The model with its format and signature recorded (models stored before they were, get them now)."""
        if model.format is not None or model.format_problem is not None:
            return model
        facts = await self.inspect(model.file_id)
        update = {"format": facts.format, "format_problem": facts.problem, "tensors": facts.tensors,
                  "graph_digest": facts.graph_digest}
        await Model.get_pymongo_collection().update_many({"file_id": model.file_id}, {"$set": update})
        return model.model_copy(update={**update, "tensors": [TensorDocument(**t) for t in facts.tensors]})

    async def create(self, owner: User, data: ModelCreate, stored: Upload) -> Model:
        """Record the metadata of an uploaded file as a new model, with its format and tensor signature."""
        facts = stored.facts
        model = Model(
            format=facts.format,
            format_problem=facts.problem,
            tensors=facts.tensors,
            graph_digest=facts.graph_digest,
            name=data.name,
            description=data.description,
            owner=owner.id,
            input_shape=data.input_shape,
            size=stored.size,
            sha256=stored.sha256,
            file_id=stored.file_id,
        )
        try:
            await model.insert()
        except BaseException:
            await self._files.delete(stored.file_id)
            raise
        return model

    async def get(self, model_id: UUID) -> Model:
        """One model by id, or 404."""
        model = await find_document(Model, {"_id": model_id})
        if model is None:
            raise NotFound(f"Model {model_id} not found.")
        return model

    async def get_accessible(self, user: User, model_id: UUID) -> Model:
        """A model the user owns or reaches as actor/participant of its training (404, then 403)."""
        model = await self.get(model_id)
        if model.owner == user.id:
            return model
        known = self._facts.target(model.id)
        if known is not None and await count_matching(Training.get_pymongo_collection(), {
                "_id": known[0], "model": model.id, **involving(user)}):
            return model  # one index-served count instead of reading the training with all its participants
        training = await find_document(Training, {"model": model.id})
        if training is None:
            self._facts.forget_target(model.id)
        else:
            self._facts.remember_target(model.id, training.id, model.id)
        check_reachable(user, model, training)
        return model

    async def current_file(self, user: User, model_id: UUID) -> StoredFile:
        """The bytes of a model the user reaches (404, then 403); for a training's global model, served from
        what this process remembers of its current round after one index-served `count` (access and round)."""
        known, seen = self._facts.target(model_id), self._facts.round_file(model_id)
        if known is not None and seen is not None and known[1] == model_id and await count_matching(
                Training.get_pymongo_collection(), {"_id": known[0], "model": model_id, "round": seen[0],
                                                    **involving(user)}):
            return seen[1]
        model = await self.get_accessible(user, model_id)
        stored = StoredFile(model.file_id, model.size, model.sha256)
        if self._facts.target(model_id) is not None:
            self._facts.remember_round_file(model_id, model.round, stored)
        return stored

    async def list_accessible(self, user: User) -> list[Model]:
        """Models the user owns or reaches through a training, newest first."""
        training_models = await Training.get_pymongo_collection().distinct(
            "model", involving(user)
        )
        found = {model.id: model for model in await Model.find({"owner": user.id}).to_list()}
        for chunk in in_chunks([model_id for model_id in training_models if model_id not in found]):
            found.update((model.id, model) for model in await Model.find({"_id": {"$in": chunk}}).to_list())
        return sorted(found.values(), key=lambda model: model.created_at, reverse=True)

    async def clone(self, model: Model, training_id: UUID) -> Model:
        """A new model with the same owner and bytes (shared file), marked with the training it is made for.

        The mark stays after the training's insert: the sweeper clears it once it sees the training (one
        update per batch of clones), so a creation makes no third write on its path.
        """
        clone = model.model_copy(
            update={"id": uuid4(), "cloned_from": model.id, "pending_training": training_id, "created_at": utcnow()}
        )
        # A plain insert of the validated model's fields: Beanie's per-document encoder cost more than the
        # rest of the clone (no hook applies to models).
        await Model.get_pymongo_collection().insert_one(clone.model_dump(by_alias=True))
        return clone

    async def sweep(self, older_than: datetime) -> int:
        """Settle clones marked before `older_than`, and delete files no model points at; returns removals."""
        removed = await self._settle_marked_clones(older_than)
        removed += await self._files.sweep_staging(older_than)
        referenced = await referenced_file_ids()  # one query per reference, not per file
        async for file_id in self._files.ids_older_than(older_than):
            if file_id not in referenced and await self.drop_unshared_file(file_id):
                removed += 1
        return removed

    async def _settle_marked_clones(self, older_than: datetime) -> int:
        """A marked clone whose training exists becomes an ordinary model; one whose training never arrived
        (a crash between the two inserts) is removed. Every change is conditional on the mark, so
        processes sweeping side by side agree; returns the removals."""
        models, trainings = Model.get_pymongo_collection(), Training.get_pymongo_collection()
        removed = 0
        for _ in range(SWEEP_MAX_BATCHES):
            marked = await models.find(
                {"pending_training": {"$ne": None}, "created_at": {"$lt": older_than}},
                {"_id": 1, "pending_training": 1, "file_id": 1},
            ).limit(SWEEP_BATCH).to_list()
            wanted = [clone["pending_training"] for clone in marked]
            arrived = {raw["_id"] async for raw in trainings.find({"_id": {"$in": wanted}}, {"_id": 1})}
            settled = [clone["_id"] for clone in marked if clone["pending_training"] in arrived]
            if settled:
                await models.update_many({"_id": {"$in": settled}, "pending_training": {"$ne": None}},
                                         {"$set": {"pending_training": None}})
            for clone in marked:
                if clone["pending_training"] not in arrived and await models.find_one_and_delete(
                        {"_id": clone["_id"], "pending_training": clone["pending_training"]}):
                    removed += 1
                    await self.drop_unshared_file(clone["file_id"])
            if len(marked) < SWEEP_BATCH:
                break
        return removed

    async def delete(self, user: User, model_id: UUID) -> None:
        """Delete a model (owner, or actor of its training) and, by cascade, its training."""
        model = await self.get(model_id)
        if model.owner != user.id:
            training = await find_document(Training, {"model": model.id})
            if training is None or training.actor != user.id:
                raise PermissionDenied(
                    "You are neither the owner of the model nor the actor of the corresponding training."
                )
        await self.purge(model)

    async def keep_clone(self, training: Training) -> None:
        """The training goes and its model stays: a clone still marked for it is an ordinary model from now on,
        so the sweeper never takes it for a leftover of a crash (cleared before the training is deleted)."""
        await Model.get_pymongo_collection().update_one(
            {"_id": training.model, "pending_training": training.id}, {"$set": {"pending_training": None}})

    async def delete_trainings(self, query: dict[str, Any]) -> None:
        """Delete trainings with their stored local updates and SWAG statistics (events stay: the audit trail)."""
        async for raw in Training.get_pymongo_collection().find(query, {"_id": 1}):
            await Training.get_pymongo_collection().delete_one({"_id": raw["_id"]})
            await drop_local_files(raw["_id"], {"$gte": 0}, self._files.delete_many)

    async def purge(self, model: Model) -> None:
        """Remove a model, its training, and its file once no model shares it."""
        await self.delete_trainings({"model": model.id})
        await model.delete()
        await self.drop_unshared_file(model.file_id)

    async def drop_unshared_file(self, file_id: UUID) -> bool:
        """Delete a file once no document points at it any more; True when it was deleted."""
        if await file_in_use(file_id):
            return False
        await self._files.delete(file_id)
        return True
