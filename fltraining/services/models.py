"""Models: creation, listing, cloning for trainings, deletion and the sweep of leftovers."""

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from fltraining.clock import utcnow
from fltraining.documents import Model, Training, User
from fltraining.engine.effects import drop_local_files
from fltraining.errors import PermissionDenied
from fltraining.schemas.models import ModelCreate
from fltraining.storage.model_store import ModelStore, Upload, involving
from fltraining.storage.queries import IN_CHUNK, find_document, in_chunks
from fltraining.storage.references import referenced_file_ids

SWEEP_BATCH = IN_CHUNK  # the batch's ids are asked for with `$in`
SWEEP_MAX_BATCHES = 100  # a bound per sweep; the next sweep goes on where this one stopped


class ModelService(ModelStore):
    """Every model rule: what the model store reads and writes, plus creation, cloning and deletion."""

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
            update={"id": uuid4(), "cloned_from": model.id, "pending_training": training_id, "created_at": utcnow(),
                    # A new training's server optimizer starts from zero, not from the original's state.
                    "optimizer_m_file_id": None, "optimizer_v_file_id": None, "optimizer_steps": 0}
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
