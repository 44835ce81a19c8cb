"""Giving models something to run: attached ONNX graphs, and ensemble models made of members."""

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

from fltraining.documents import Model, User
from fltraining.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from fltraining.schemas.models import EnsembleCreate
from fltraining.services.models import ModelService
from fltraining.storage.blobs import StoredFile
from fltraining.weights.formats import MAX_TENSOR_BYTES, UnsupportedModelFormat, file_buffer
from fltraining.weights.onnx_files import describe_onnx
from fltraining.weights.signature import check_matches, from_documents, signature_of

MODEL_MISMATCH = "The model file does not match the global model"


def _graph_facts(path: str) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
    """A graph file's digest and initializer signature (400 for anything but a runnable ONNX graph)."""
    data = file_buffer(path)
    if len(data) == 0:
        raise UnsupportedModelFormat("the graph file is empty")
    try:
        tensors, digest = describe_onnx(data, MAX_TENSOR_BYTES)
    except UnsupportedModelFormat:
        raise
    except Exception:  # protobuf's DecodeError and its relatives: not an ONNX file at all
        raise InvalidInput("graph_file is not an ONNX model file.") from None
    return digest, signature_of(tensors)


class GraphService:
    """Attaches graphs to models stored as tensors, and builds ensemble models."""

    def __init__(self, models: ModelService) -> None:
        self._models = models

    async def store_graph(self, chunks: AsyncIterator[bytes]) -> StoredFile:
        """Stream a graph file into the blob store (size bounded like a model file); checked on attach."""
        return await self._models.files.put(chunks, self._models.max_bytes)

    async def discard(self, stored: StoredFile) -> None:
        """Remove a graph file whose attachment was refused."""
        await self._models.files.delete(stored.file_id)

    async def attach(self, user: User, model_id: UUID, stored: StoredFile) -> Model:
        """Make `stored` the model's graph: owner only, initializers matching the model's tensors one to one."""
        model = await self._models.described(await self._models.get(model_id))
        if model.owner != user.id:
            raise PermissionDenied("Only the model's owner may attach its graph.")
        if model.format == "onnx":
            raise Conflict("The model is an ONNX file: its own graph runs; upload a new model to change it.")
        if model.ensemble_members:
            raise Conflict("An ensemble model runs its members' graph; attach graphs to the members.")
        if model.format is None:
            raise Conflict(f"The model file cannot be read ({model.format_problem}); a graph cannot use it.")
        async with self._models.files.local_copy(stored.file_id) as path:
            digest, signature = await asyncio.to_thread(_graph_facts, str(path))
        try:
            check_matches(from_documents([t.model_dump() for t in model.tensors]), signature, "graph_file")
        except InvalidInput as error:
            detail = error.detail.replace(MODEL_MISMATCH, "The graph's initializers do not match the model's tensors")
            raise InvalidInput(detail, error.errors) from None
        before = await Model.get_pymongo_collection().find_one_and_update(
            {"_id": model.id}, {"$set": {"graph_file_id": stored.file_id, "graph_digest": digest}})
        if before is None:
            raise NotFound(f"Model {model_id} not found.")
        if before.get("graph_file_id") is not None:
            await self._models.drop_unshared_file(before["graph_file_id"])
        return model.model_copy(update={"graph_file_id": stored.file_id, "graph_digest": digest})

    async def create_ensemble(self, user: User, data: EnsembleCreate) -> Model:
        """A model whose inference runs each member once (DLR's mean model): members the user owns, with one
        tensor signature and one graph; it shares its first member's file, so it downloads and trains as any model."""
        members: list[Model] = []
        for member_id in data.models:
            member = await self._models.described(await self._models.get(member_id))
            if member.owner != user.id:
                raise PermissionDenied(f"You do not own the model {member_id}; an ensemble is made of your models.")
            if member.graph_digest is None:
                raise InvalidInput(f"Model {member_id} has no ONNX graph; an ensemble's members must have one.")
            if member.ensemble_members:
                raise InvalidInput(f"Model {member_id} is an ensemble itself; list its members instead.")
            members.append(member)
        first = members[0]
        for member in members[1:]:
            if member.graph_digest != first.graph_digest:
                raise InvalidInput(f"Model {member.id} runs another graph than model {first.id}.")
            try:
                check_matches(from_documents([t.model_dump() for t in first.tensors]),
                              from_documents([t.model_dump() for t in member.tensors]), "models")
            except InvalidInput as error:
                raise InvalidInput(error.detail.replace(MODEL_MISMATCH, f"Model {member.id} differs from {first.id}"),
                                   error.errors) from None
        ensemble = Model(
            name=data.name, description=data.description, owner=user.id, input_shape=first.input_shape,
            size=first.size, sha256=first.sha256, file_id=first.file_id, format=first.format, tensors=first.tensors,
            graph_file_id=first.graph_file_id if first.format != "onnx" else None, graph_digest=first.graph_digest,
            ensemble_members=[member.id for member in members],
        )
        await ensemble.insert()
        return ensemble
