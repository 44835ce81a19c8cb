"""`POST /api/inference/`: which weights and graph a model runs with, and how its uncertainty is computed."""

import asyncio
import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import onnxruntime
from pydantic import ValidationError

from fltraining.documents import Dataset, Model, Training, Update, User
from fltraining.engine.effects import EvaluationFailed
from fltraining.errors import Conflict, FLTrainingError, NotFound
from fltraining.inference import inputs, runner
from fltraining.inference.evaluation import read_dataset, score
from fltraining.inference.graphs import BoundSession, Variant, build_session
from fltraining.inference.pool import InferencePool, SessionCache
from fltraining.options import UncertaintyOptions
from fltraining.states import UncertaintyMethod
from fltraining.storage.blobs import BlobMissing
from fltraining.storage.model_store import ModelStore, check_reachable
from fltraining.storage.queries import find_document
from fltraining.weights.formats import load_tensors

NO_GRAPH = ("Model {id} has no ONNX graph to run: upload the model as an .onnx file, or attach its graph with "
            "PUT /api/models/{id}/graph/ (multipart graph_file).")


@dataclass(frozen=True)
class SessionKey:
    """A session: a graph file with a weights file bound (None when the weights are fed per run)."""

    graph: UUID
    weights: UUID | None
    variant: Variant


@dataclass(frozen=True)
class Plan:
    """Everything one request runs, decided on the event loop from the documents."""

    method: UncertaintyMethod
    options: UncertaintyOptions
    graph: UUID
    input_shape: list[int | None] | None
    sessions: tuple[SessionKey, ...]
    moments: tuple[UUID, UUID] | None = None
    current: UUID | None = None  # SWAG: the weights its unsampled (integer) tensors keep


def graph_file_of(model: Model) -> UUID | None:
    """The file holding the model's graph: the model file itself for ONNX models, else an attached graph."""
    return model.file_id if model.format == "onnx" else model.graph_file_id


class InferenceService:
    """Runs models' graphs in onnxruntime with their current weights, as their training's method says."""

    def __init__(self, models: ModelStore, pool: InferencePool, cache: SessionCache, max_elements: int,
                 session_threads: int) -> None:
        self._models = models
        self._pool = pool
        self._cache = cache
        self._max_elements = max_elements
        self._session_threads = session_threads

    @property
    def max_elements(self) -> int:
        """The most numbers a model_input may hold."""
        return self._max_elements

    async def infer(self, user: User, model_id: UUID, model_input: np.ndarray) -> runner.Outcome:
        """Predict with the model the user may see (404/403), with the uncertainty of its training's method."""
        # The model and its training in one round trip's time (the access rule needs both anyway).
        model, training = await asyncio.gather(find_document(Model, {"_id": model_id}),
                                               find_document(Training, {"model": model_id}))
        if model is None:
            raise NotFound(f"Model {model_id} not found.")
        check_reachable(user, model, training)
        model = await self._models.described(model)
        plan = await self._plan(model, training)
        for attempt in range(2):
            try:
                async with contextlib.AsyncExitStack() as stack:
                    paths = {file_id: await stack.enter_async_context(self._models.files.local_copy(file_id))
                             for file_id in self._files_to_read(plan)}
                    return await self._pool.run(partial(self._compute, plan, model_input, paths))
            except BlobMissing:
                if attempt:  # a round replaced the weights twice while we looked
                    raise Conflict("The model changed while it was being read; try again.") from None
                plan = await self._plan(await self._models.get(model.id),
                                        await find_document(Training, {"model": model.id}))
        raise AssertionError("unreachable")

    async def _plan(self, model: Model, training: Training | None) -> Plan:
        graph = graph_file_of(model)
        if graph is None:
            raise Conflict(NO_GRAPH.format(id=model.id))
        raw_options = (training.options if training is not None else {}).get("uncertainty") or {}
        try:
            options = UncertaintyOptions.model_validate(raw_options)
        except ValidationError:
            raise Conflict("The training's options.uncertainty is not valid (N 1–1000, softmax true/false, "
                           "seed a non-negative integer); fix it before asking for inference.") from None
        if model.ensemble_members:
            members = await self._members(model)
            return Plan(UncertaintyMethod.ENSEMBLE, options, graph, model.input_shape,
                        tuple(SessionKey(graph, file_id, "eval") for file_id in members))
        method = training.uncertainty_method if training is not None else UncertaintyMethod.NONE
        if method == UncertaintyMethod.SWAG:
            if model.swag_first_file_id is None or model.swag_second_file_id is None:
                raise Conflict("The training has no aggregated SWAG moments yet: inference with SWAG is possible "
                               "after its first SWAG round.")
            return Plan(method, options, graph, model.input_shape, (SessionKey(graph, None, "weights_as_inputs"),),
                        (model.swag_first_file_id, model.swag_second_file_id), model.file_id)
        if method == UncertaintyMethod.ENSEMBLE:
            assert training is not None
            local = await self._last_local_models(training)
            return Plan(method, options, graph, model.input_shape,
                        tuple(SessionKey(graph, file_id, "eval") for file_id in local))
        variant: Variant = "dropout" if method == UncertaintyMethod.MC_DROPOUT else "eval"
        return Plan(method, options, graph, model.input_shape, (SessionKey(graph, model.file_id, variant),))

    async def _members(self, ensemble: Model) -> list[UUID]:
        """The member models' current weight files (a member in a training moves on with it)."""
        found = {raw["_id"]: raw async for raw in Model.get_pymongo_collection().find(
            {"_id": {"$in": ensemble.ensemble_members}}, {"file_id": 1, "graph_digest": 1})}
        files = []
        for member in ensemble.ensemble_members or []:
            if member not in found:
                raise Conflict(f"The ensemble's member model {member} was deleted; create the ensemble anew.")
            if found[member].get("graph_digest") != ensemble.graph_digest:
                raise Conflict(f"The ensemble's member model {member} no longer has the ensemble's graph.")
            files.append(found[member]["file_id"])
        return files

    async def _last_local_models(self, training: Training) -> list[UUID]:
        """The local models of the latest round whose updates are kept (ENSEMBLE of a federated training)."""
        latest = await Update.get_pymongo_collection().find_one(
            {"training": training.id}, {"round": 1}, sort=[("round", -1)])
        if latest is None:
            raise Conflict("The training keeps no local models to run as an ensemble: start it with "
                           "options.keep_local_models = true, or create an ensemble model with "
                           "POST /api/models/ensembles/.")
        cursor = Update.get_pymongo_collection().find(
            {"training": training.id, "round": latest["round"]}, {"file_id": 1}).sort("user", 1)
        return [raw["file_id"] async for raw in cursor]

    def _files_to_read(self, plan: Plan) -> set[UUID]:
        """The files the cache cannot answer for."""
        needed: set[UUID] = set()
        for key in plan.sessions:
            if key not in self._cache:
                needed.add(plan.graph)
                if key.weights is not None:
                    needed.add(key.weights)
        if plan.moments is not None and plan.moments not in self._cache:
            needed.update(plan.moments)
        if plan.current is not None and ("weights", plan.current) not in self._cache:
            needed.add(plan.current)
        return needed

    def _cached[T](self, key: Hashable, build: Callable[[], T]) -> T:
        found = self._cache.get(key)
        if found is None:
            found = build()
            self._cache.put(key, found)
        return found  # type: ignore[return-value]

    def _session(self, key: SessionKey, paths: dict[UUID, Path]) -> BoundSession:
        def build() -> BoundSession:
            weights = None if key.weights is None else load_tensors(paths[key.weights])
            return build_session(paths[key.graph].read_bytes(), weights, key.variant, self._session_threads)
        return self._cached(key, build)

    def _weights(self, file_id: UUID, paths: dict[UUID, Path]) -> dict[str, np.ndarray]:
        return self._cached(("weights", file_id), lambda: load_tensors(paths[file_id]))

    def _compute(self, plan: Plan, raw: np.ndarray, paths: dict[UUID, Path],
                 options: onnxruntime.RunOptions) -> runner.Outcome:
        sessions = [self._session(key, paths) for key in plan.sessions]
        x = inputs.for_graph(raw, sessions[0].data_input, plan.input_shape)
        passes = plan.options.N
        match plan.method:
            case UncertaintyMethod.NONE:
                return runner.single(runner.run_stacked(sessions[0], x, 1, self._max_elements, options)[0])
            case UncertaintyMethod.MC_DROPOUT:
                outputs = runner.run_stacked(sessions[0], x, passes, self._max_elements, options)
            case UncertaintyMethod.ENSEMBLE:
                outputs = runner.run_members(sessions, x, options)
            case UncertaintyMethod.SWAG:
                assert plan.moments is not None and plan.current is not None
                first, second = plan.moments
                moments = self._cached(
                    plan.moments, lambda: runner.moments_of(load_tensors(paths[first]), load_tensors(paths[second])))
                current = self._weights(plan.current, paths)
                outputs = runner.run_sampled(sessions[0], x, passes, current, moments, plan.options.seed, options)
        return runner.summarise(outputs, plan.options.softmax)

    async def evaluate(self, effect: dict[str, Any]) -> dict[str, float]:
        """Score the global model file an aggregation made on the training's data set (off the event loop)."""
        model = await find_document(Model, {"_id": effect["model"]})
        dataset = await find_document(Dataset, {"_id": effect["dataset"]})
        if model is None or dataset is None:
            raise EvaluationFailed("the model or the data set was deleted")
        graph = effect["file_id"] if model.format == "onnx" else model.graph_file_id
        if graph is None:
            raise EvaluationFailed("the model has no ONNX graph")
        try:
            async with contextlib.AsyncExitStack() as stack:
                paths = {file_id: await stack.enter_async_context(self._models.files.local_copy(file_id))
                         for file_id in {graph, effect["file_id"], dataset.file_id}}
                key = SessionKey(graph, effect["file_id"], "eval")
                return await asyncio.to_thread(self._score, key, paths, paths[dataset.file_id])
        except (FLTrainingError, BlobMissing, ValueError) as error:
            raise EvaluationFailed(getattr(error, "detail", None) or str(error)) from None

    def _score(self, key: SessionKey, paths: dict[UUID, Path], dataset: Path) -> dict[str, float]:
        session = self._session(key, paths)
        x, y = read_dataset(dataset)
        x = inputs.for_graph(x, session.data_input, None)
        rows = max(1, self._max_elements // max(1, x[0].size))
        options = onnxruntime.RunOptions()
        outputs = [runner.run_stacked(session, x[start:start + rows], 1, self._max_elements, options)[0]
                   for start in range(0, len(x), rows)]
        return score(np.concatenate(outputs), y)
