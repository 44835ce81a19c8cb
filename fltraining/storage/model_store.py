"""Models' metadata and bytes as the round engine, inference and the services read them: upload, describe,
read with the access rule, drop a file nothing points at."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from fltraining.documents import Model, TensorDocument, Training, User
from fltraining.errors import InvalidInput, NotFound, PermissionDenied
from fltraining.storage.blobs import BlobStore, StoredFile
from fltraining.storage.facts import ImmutableFacts
from fltraining.storage.queries import count_matching, find_document
from fltraining.storage.references import file_in_use
from fltraining.weights.inspect import FileFacts, inspect_file


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


class ModelStore:
    """Models' bytes through the blob store, their metadata through the `models` collection, read with the
    access rule."""

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

    async def drop_unshared_file(self, file_id: UUID, model_file: bool = False) -> bool:
        """Delete a file once no document points at it any more (a `model_file`, a model's weights, optimizer state
        or SWAG moments, is looked for only where one can be named); True when it was deleted."""
        if await file_in_use(file_id, model_file):
            return False
        await self._files.delete(file_id)
        return True

    async def drop_model_file(self, file_id: UUID) -> bool:
        """Delete a model's file once no model or pending effect names it; True when it was deleted."""
        return await self.drop_unshared_file(file_id, model_file=True)
