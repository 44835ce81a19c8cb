"""Held-out data sets for server-side evaluation: stored in the blob store, visible to their owner only."""

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

from fltraining.documents import Dataset, User
from fltraining.errors import NotFound, PermissionDenied
from fltraining.inference.evaluation import describe_dataset
from fltraining.services.models import ModelService
from fltraining.storage.blobs import StoredFile


class DatasetService:
    """Upload, read and delete data sets; the files share the models' blob store and sweeper."""

    def __init__(self, models: ModelService, max_bytes: int) -> None:
        self._models = models
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        """The largest data set file."""
        return self._max_bytes

    async def store_file(self, chunks: AsyncIterator[bytes]) -> StoredFile:
        """Stream a data set file into the blob store (413 past the limit); checked on create."""
        return await self._models.files.put(chunks, self._max_bytes)

    async def discard(self, stored: StoredFile) -> None:
        """Remove a data set file whose upload was refused."""
        await self._models.files.delete(stored.file_id)

    async def create(self, owner: User, name: str, stored: StoredFile) -> Dataset:
        """Check the file (an .npz of x and y, no pickles; 400 otherwise) and record it."""
        async with self._models.files.local_copy(stored.file_id) as path:
            facts = await asyncio.to_thread(describe_dataset, path)
        dataset = Dataset(owner=owner.id, name=name, file_id=stored.file_id, size=stored.size, sha256=stored.sha256,
                          samples=facts.samples, x_shape=facts.x_shape, x_dtype=facts.x_dtype,
                          y_shape=facts.y_shape, y_dtype=facts.y_dtype)
        await dataset.insert()
        return dataset

    async def get_owned(self, user: User, dataset_id: UUID) -> Dataset:
        """A data set of the user's (404 when unknown, 403 when someone else's)."""
        raw = await Dataset.get_pymongo_collection().find_one({"_id": dataset_id})
        if raw is None:
            raise NotFound(f"Dataset {dataset_id} not found.")
        dataset = Dataset.model_validate(raw)
        if dataset.owner != user.id:
            raise PermissionDenied("A data set is visible to its owner only.")
        return dataset

    async def list_owned(self, user: User) -> list[Dataset]:
        """The user's data sets, newest first."""
        cursor = Dataset.get_pymongo_collection().find({"owner": user.id}).sort("created_at", -1)
        return [Dataset.model_validate(raw) async for raw in cursor]

    async def delete(self, user: User, dataset_id: UUID) -> None:
        """Delete a data set of the user's and its file (trainings naming it record failed evaluations)."""
        dataset = await self.get_owned(user, dataset_id)
        if await Dataset.get_pymongo_collection().find_one_and_delete({"_id": dataset.id}):
            await self._models.drop_unshared_file(dataset.file_id)
