"""The round engine: decides each running training's next step and performs it.

Any process may advance any training. Waiting phases end with a claim (one conditional update
that takes the aggregation lease); the aggregation's result is committed with one conditional
update on (training, round, lease owner), so a round is aggregated once even when a lease expired
and another process redid the work. Steps write their effects into the training in the same
update; they are applied afterwards and again by the reconciler if a process died in between.
"""

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
from pymongo.errors import PyMongoError

from fltraining.clock import utcnow
from fltraining.documents import ChainLink, Model, SwagStatistic, Training, Update
from fltraining.engine import plans
from fltraining.engine.arrivals import RECORDED_BY, Arrivals, arrived_documents, count_stored
from fltraining.engine.bell import ChangeBell
from fltraining.engine.completion import CompletionWatch
from fltraining.engine.effects import (
    AppliedEffects,
    Effectors,
    Effects,
    Evaluate,
    LaterOutbox,
    Outbox,
    apply_pending,
    pending,
    remove_applied,
)
from fltraining.errors import FLTrainingError
from fltraining.options import AggregationRule, DifferentialPrivacy, ServerOptimizer
from fltraining.schemas.common import iso_z
from fltraining.states import RUNNING, Phase, TrainingState, Transition
from fltraining.storage.blobs import StoredFile, staged_from_path
from fltraining.storage.model_store import ModelStore
from fltraining.weights.aggregate import derangement
from fltraining.weights.dp import PrivateRound, private_of_files
from fltraining.weights.formats import Format
from fltraining.weights.optimizers import OptimizerStep, optimizer_files
from fltraining.weights.robust import KrumChoice, rule_of_files
from fltraining.weights.signature import Signature, from_documents

log = logging.getLogger(__name__)

MAX_STEPS_PER_ADVANCE = 16
MERGED_REMOVAL_MAX_PARTICIPANTS = 100
MAX_REMEMBERED_STEPS = 1_000  # entries of the engine's per-step memories (files, global models): caches, cleared when full
Action = Callable[[], Awaitable[bool]]


def daisy_chain(updates: list[Update], participants: list[UUID], rng: random.Random) -> list[ChainLink]:
    """FedDC: hand each participant another participant's local model (no one keeps their own if avoidable)."""
    by_user = {update.user: update.id for update in updates}
    owners = [user for user in participants if user in by_user]
    links: list[ChainLink] = []
    if len(owners) >= 2:
        permutation = derangement(len(owners), rng)
        links = [ChainLink(user=user, model=by_user[owners[target]]) for user, target in zip(owners, permutation)]
    elif owners:
        links = [ChainLink(user=owners[0], model=by_user[owners[0]])]
    pool = list(by_user.values())
    # Participants who joined after the sub-round began have no model of their own to avoid.
    links += [ChainLink(user=user, model=rng.choice(pool)) for user in participants if user not in by_user]
    return links


def krum_record(choice: KrumChoice | None, updates: list[Update]) -> dict[str, Any]:
    """What an aggregation event records of Krum's choice: the selected participants and every score."""
    if choice is None:
        return {}
    return {"selected": [str(updates[index].user) for index in choice.selected],
            "scores": {str(update.user): score for update, score in zip(updates, choice.scores, strict=True)}}


def private_record(private: PrivateRound, updates: list[Update], privacy: DifferentialPrivacy,
                   rounds: int) -> dict[str, Any]:
    """What an aggregation event records of a private round: ε so far, how many updates were clipped."""
    record: dict[str, Any] = {"privacy": {
        **plans.privacy_spent(privacy, rounds), "clipped": private.clipped, "averaged": private.averaged}}
    if private.selected is not None and private.scores is not None:
        record |= krum_record(KrumChoice(private.scores, private.selected), updates)
    return record


def layout(model: Model) -> tuple[Signature, Format]:
    """A global model's tensor signature and file format (described at start: safetensors if not yet)."""
    fmt: Format = model.format or "safetensors"  # type: ignore[assignment]
    return from_documents([t.model_dump() for t in model.tensors]), fmt


def present(paths: list[Path | None]) -> list[Path]:
    """Local copies of inputs that cannot be absent."""
    if any(path is None for path in paths):
        raise ValueError("a required file is missing")
    return [path for path in paths if path is not None]


def arrivals(updates: list[Update]) -> list[dict[str, Any]]:
    """The audit of a round's accepted updates (who, when, how much), listed in its aggregation event."""
    return [{"user": str(update.user), "update": str(update.id), "at": iso_z(update.created_at),
             "sample_size": update.sample_size, "size": update.size, "sha256": update.sha256}
            for update in updates]


class LeaseKeeper:
    """Extends an aggregation lease while the work behind it makes progress; stuck work lets it run out."""

    def __init__(self, training_id: UUID, token: str, lease: timedelta) -> None:
        self._training_id = training_id
        self._token = token
        self._lease = lease
        self.progress = 0
        self._renewed_at_progress = 0

    def advanced(self) -> None:
        """Record a step of progress (an update added, a file stored)."""
        self.progress += 1

    async def run(self) -> None:
        """Renew the lease every third of its length if progress was made since the last renewal."""
        while True:
            await asyncio.sleep(self._lease.total_seconds() / 3)
            if self.progress == self._renewed_at_progress:
                continue
            self._renewed_at_progress = self.progress
            with contextlib.suppress(PyMongoError):  # the lease may run out; the commit then says so
                await Training.get_pymongo_collection().update_one(
                    {"_id": self._training_id, "lease_owner": self._token, "phase": str(Phase.AGGREGATING)},
                    {"$set": {"lease_until": utcnow() + self._lease}},
                )


class RoundEngine:
    """Advances running trainings; one instance per service process."""

    def __init__(self, models: ModelStore, lease_seconds: float, hold_after_claim: bool = False,
                 hold_before_commit: int | None = None) -> None:
        self._models = models
        self._files = models.files
        self._lease = timedelta(seconds=lease_seconds)
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        # Fault tests only: claim aggregations and never finish them, or compute one round's and never commit it
        # (a process that hangs there).
        self._hold_after_claim = hold_after_claim
        self._hold_before_commit = hold_before_commit
        self._running: dict[UUID, asyncio.Task[None]] = {}
        self._cleaning: dict[UUID, asyncio.Task[None]] = {}
        self._applied = AppliedEffects()
        self._local_files: dict[str, list[UUID]] = {}  # see Effectors.local_files
        self._global_models: dict[UUID, tuple[int, Model]] = {}  # see _global_model
        self._again: set[UUID] = set()
        self._rng = random.SystemRandom()
        self.outbox: Outbox = LaterOutbox()  # the process's notification delivery, set where it is built
        self.bell = ChangeBell()  # wakes this process's event streams
        self.completion = CompletionWatch(self.kick)  # notices rounds whose uploads are complete
        self.evaluate: Evaluate | None = None  # server-side evaluation, set where inference is built

    # -- scheduling ---------------------------------------------------------------------------

    def kick(self, training_id: UUID) -> None:
        """Advance a training soon, in the background (coalesced per training)."""
        if training_id in self._running:
            self._again.add(training_id)
            return
        self._running[training_id] = asyncio.create_task(self._run(training_id), name=f"advance-{training_id}")

    async def _run(self, training_id: UUID) -> None:
        try:
            while True:
                self._again.discard(training_id)
                try:
                    await self.advance(training_id)
                except PyMongoError as error:
                    log.warning("advancing a training failed: database unavailable (%s)", type(error).__name__)
                except Exception:
                    log.exception("advancing a training failed")
                if training_id not in self._again:
                    return
        finally:
            self._running.pop(training_id, None)

    async def close(self) -> None:
        """Cancel work in progress; leases it held expire and another process redoes it."""
        self.completion.close()
        tasks = [*self._running.values(), *self._cleaning.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reconcile(self) -> None:
        """Look at every running training (timeouts, expired leases) and at effects a dead process left pending."""
        collection = Training.get_pymongo_collection()
        # Two indexed queries rather than one `$or`: the embedded store reads every document for an `$or`.
        for query in ({"state": {"$in": [str(s) for s in RUNNING]}}, {"effects_pending": True}):
            async for raw in collection.find(query, {"_id": 1}):
                if raw["_id"] not in self._running:
                    self.kick(raw["_id"])

    # -- stepping -----------------------------------------------------------------------------

    async def advance(self, training_id: UUID) -> None:
        """Take every step the training is ready for."""
        for _ in range(MAX_STEPS_PER_ADVANCE):
            raw = await Training.get_pymongo_collection().find_one({"_id": training_id})
            if raw is None:
                return
            training = Training.model_validate(raw)
            if training.effects:
                await self.apply_effects(training)
            elif training.effects_pending:
                # Conditional: a step that added effects since this read keeps the marker set.
                await Training.get_pymongo_collection().update_one(
                    {"_id": training.id, "effects": {"$size": 0}, "effects_pending": True},
                    {"$set": {"effects_pending": False}})
            arrived, documents = await self._arrived(training)
            action = self._decide(training, utcnow(), arrived, documents)
            if action is None or not await action():
                return

    async def _arrived(self, training: Training) -> tuple[set[UUID], Arrivals | None]:
        """Who arrived in the waiting phase (with their stored contributions where they have documents); while
        an index count says the round cannot be complete and no deadline passed, the round's documents are not
        read (the reconciler looks every few seconds). A count the completion watch just made is not made again."""
        if training.state not in RUNNING or training.phase in (None, Phase.AGGREGATING):
            return set(), None
        if training.phase in RECORDED_BY and not (
                training.round_deadline is not None and training.round_deadline <= utcnow()):
            expected = plans.expected_users(training)
            if len(expected) == len(training.round_participants) and not self.completion.counted_complete(
                    training.id, training.round, training.phase) and (
                    await count_stored(training.phase, training.id, training.round) < len(expected)):
                return set(), None  # not all there: nothing to decide but a prune, which the lengths rule out
        if training.phase not in RECORDED_BY:  # test metrics: counted in the training itself
            return set(training.round_participants) & set(training.round_arrived), None
        documents = await arrived_documents(training)
        return set(documents), documents

    async def apply_effects(self, training: Training) -> None:
        """Apply a training's pending effects (clean-up in the background) and wake the notification delivery."""
        clean_up = bool(pending(training, cleanup=True)) and training.id not in self._cleaning
        # A clean-up started here removes the step's effects of both lanes with one update when it ends; a
        # large training's are removed at once, since every read of the training carries them until then (a
        # round's notification lists each participant, its aggregation event each arrival).
        merged = clean_up and len(training.participants) <= MERGED_REMOVAL_MAX_PARTICIPANTS
        applied = await apply_pending(training, self._effectors(), remove=not merged)
        if training.state in RUNNING and training.phase in RECORDED_BY and training.round_participants:
            self.completion.expect(training.id, training.round, training.phase, len(plans.expected_users(training)))
        self.bell.ring(training.id)
        if clean_up:
            self._cleaning[training.id] = asyncio.create_task(self._clean(training, applied if merged else []),
                                                              name=f"clean-{training.id}")

    def _effectors(self) -> Effectors:
        return Effectors(self._models.drop_model_file, self._files.delete_many, self.outbox, self.evaluate,
                         self._models.facts.remember_round_file, self._applied, self._local_files)

    async def _clean(self, training: Training, applied: list[str]) -> None:
        """Apply the clean-up effects, then remove them and the main lane's `applied` ones (if not removed yet)
        from the training."""
        effectors = self._effectors()
        try:
            cleaned = await apply_pending(training, effectors, cleanup=True, remove=False)
            if applied or cleaned:
                # The main lane's effects are removed by now, or among these: the rest is likely all there is.
                await remove_applied(training, [*applied, *cleaned], effectors, alone=True)
        except BaseException as error:
            effectors.applied.forget(applied)  # applied again, then removed, at the next look
            if isinstance(error, PyMongoError):
                log.warning("clean-up of a training failed: database unavailable (%s)", type(error).__name__)
            elif isinstance(error, Exception):
                log.exception("clean-up of a training failed")
            else:
                raise
        finally:
            self._cleaning.pop(training.id, None)

    def _decide(self, training: Training, now: datetime, arrived_users: set[UUID],
                documents: Arrivals | None = None) -> Action | None:
        if training.state not in RUNNING or training.phase is None:
            return None
        if training.phase == Phase.AGGREGATING:
            if training.lease_until is not None and training.lease_until <= now:
                return lambda: self._reclaim(training, now)
            return None
        expected = plans.expected_users(training)
        if len(expected) != len(training.round_participants):
            return lambda: self._prune(training)
        missing = plans.missing_users(training, arrived_users)
        timed_out = training.round_deadline is not None and training.round_deadline <= now
        if training.phase == Phase.TESTING:
            if not missing or timed_out:
                return lambda: self._end_testing(training)
            return None
        arrived = len(arrived_users)
        if arrived and not missing:
            return lambda: self._claim(training, now, documents)
        if not arrived and not expected:
            return lambda: self._fail(training, {"reason": "no_participants"})
        if timed_out:
            quorum = plans.option(training, "min_updates", len(expected))
            if arrived and arrived >= quorum:
                return lambda: self._claim(training, now)
            return lambda: self._fail(training, {
                "reason": "round_timeout", "round": training.round, "phase": str(training.phase),
                "arrived": arrived, "missing": [str(user) for user in missing],
            })
        return None

    def _pinned(self, training: Training) -> dict[str, Any]:
        """The filter that fails when the training moved on since it was read."""
        return {"state": str(training.state), "phase": None if training.phase is None else str(training.phase),
                "round": training.round}

    async def _prune(self, training: Training) -> bool:
        stale = [user for user in training.round_participants if user not in set(training.participants)]
        effects = plans.new_effects()
        written = await plans.write_step(training, self._pinned(training), {}, effects,
                                         {"$pull": {"round_participants": {"$in": stale}}})
        return written is not None

    async def _fail(self, training: Training, detail: dict[str, Any]) -> bool:
        return await self._step(training, lambda fields, effects: plans.fail(
            training, fields, effects, Transition.FAIL, {**detail, "at": iso_z(effects.at)}))

    async def _end_testing(self, training: Training) -> bool:
        return await self._step(training, lambda fields, effects: plans.after_testing(training, fields, effects))

    async def _step(self, training: Training, plan: Callable[[plans.Fields, Effects], None]) -> bool:
        """One planned step, written conditionally on the training not having moved, its effects applied."""
        effects = plans.new_effects()
        fields: plans.Fields = {}
        plan(fields, effects)
        written = await plans.write_step(training, self._pinned(training), fields, effects)
        if written is not None:
            await self.apply_effects(written)
        return written is not None

    def _new_token(self) -> str:
        return f"{self._owner}:{secrets.token_hex(6)}"

    async def _claim(self, training: Training, now: datetime, documents: Arrivals | None = None) -> bool:
        token = self._new_token()
        fields = {"phase": str(Phase.AGGREGATING), "locked": True, "lease_owner": token,
                  "lease_until": now + self._lease, "round_deadline": None}
        claimed = await plans.write_step(training, self._pinned(training), fields, plans.new_effects())
        if claimed is None:
            return False
        # After a commit the new phase waits for its participants (the completion watch, an API call or the
        # reconciler looks again); only an aggregation that did not commit makes the training worth a new look now.
        return not await self._aggregate(claimed, token, documents)

    async def _reclaim(self, training: Training, now: datetime) -> bool:
        token = self._new_token()
        condition = {**self._pinned(training), "lease_owner": training.lease_owner, "lease_until": {"$lte": now}}
        effects = plans.new_effects()
        effects.event("lease_expired", training.round, previous_owner=training.lease_owner)
        claimed = await plans.write_step(training, condition, {"lease_owner": token, "lease_until": now + self._lease},
                                         effects)
        if claimed is None:
            return False
        log.info("aggregation lease of a training expired; redoing round %d", training.round)
        return not await self._aggregate(claimed, token)

    # -- aggregation --------------------------------------------------------------------------

    async def _aggregate(self, training: Training, token: str, documents: Arrivals | None = None) -> bool:
        """Aggregate a claimed round and commit it; True when it committed (`documents`: the round's contributions
        as read before the claim)."""
        if self._hold_after_claim:
            await asyncio.Event().wait()
        created: list[StoredFile] = []
        keeper = LeaseKeeper(training.id, token, self._lease)
        keeping = asyncio.create_task(keeper.run(), name=f"lease-{training.id}")
        try:
            model = await self._global_model(training)
            effects = plans.new_effects()
            fields: plans.Fields = {}
            if training.state == TrainingState.SWAG_ROUND:
                await self._aggregate_moments(training, model, fields, effects, created, keeper)
            else:
                await self._aggregate_updates(training, model, fields, effects, created, keeper, documents)
        except (FLTrainingError, ValueError) as error:
            await self._drop(created)
            log.warning("aggregation of round %d failed: %s", training.round, error)
            await self._fail(training, {"reason": "aggregation_failed", "error": str(error)[:500]})
            return False
        except BaseException:
            await self._drop(created)
            raise
        finally:
            keeping.cancel()
        if self._hold_before_commit == training.round:
            log.warning("fault test: holding round %d before its commit", training.round)
            await asyncio.Event().wait()
        condition = {**self._pinned(training), "lease_owner": token}
        committed = await plans.write_step(training, condition, fields, effects)
        if committed is None:
            await self._drop(created)
            log.info("aggregation of round %d not committed: the training moved on", training.round)
            return False
        self._remember(model, effects)
        await self.apply_effects(committed)
        return True

    async def _global_model(self, training: Training) -> Model:
        """The training's global model as of its round: as this process's commit of the round before left it (the
        aggregation's only writer), else read."""
        known = self._global_models.pop(training.model, None)
        if known is not None and known[0] == training.round:
            return known[1]
        return Model.model_validate(await Model.get_pymongo_collection().find_one({"_id": training.model}))

    def _remember(self, model: Model, effects: Effects) -> None:
        """Remember what a committed step's effects will need: the global model as its `sync_model` sets it (only
        a described model: describing one stored before uploads were described may change its format), and the
        files of the updates its `drop_local` deletes."""
        if len(self._global_models) >= MAX_REMEMBERED_STEPS or len(self._local_files) >= MAX_REMEMBERED_STEPS:
            self._global_models.clear()  # caches of steps whose effects another process applied
            self._local_files.clear()
        self._local_files.update(effects.local_files)
        for effect in effects.items:
            if effect["kind"] == "sync_model" and model.format is not None:
                self._global_models[model.id] = (effect["round"], model.model_copy(
                    update={"round": effect["round"], **(effect["file"] or {})}))

    async def _computed_files[T](
        self, inputs: list[UUID | None], outputs: int, keeper: LeaseKeeper,
        compute: Callable[[list[Path | None], list[Path]], T],
    ) -> tuple[T, list[StoredFile]]:
        """`compute(local copies of the inputs, staged output paths)` in a worker thread (an absent input is
        None), its outputs committed to the blob store; what it returned and the stored outputs."""
        outs = [self._files.staging.new_path() for _ in range(outputs)]
        async with contextlib.AsyncExitStack() as stack:
            paths = [None if file_id is None else await stack.enter_async_context(self._files.local_copy(file_id))
                     for file_id in inputs]
            try:
                # A full disk is not the round's fault: the error ends this attempt and the lease lets another redo it.
                result = await asyncio.to_thread(compute, paths, outs)
                staged = [await asyncio.to_thread(staged_from_path, out) for out in outs]
            except BaseException:
                for out in outs:
                    out.unlink(missing_ok=True)
                raise
        keeper.advanced()
        return result, [await self._files.commit(one) for one in staged]

    async def _mean_file(
        self, files: list[UUID], weights: list[int], model: Model, keeper: LeaseKeeper, field: str,
        rule: AggregationRule | None = None,
    ) -> tuple[StoredFile, KrumChoice | None]:
        """Stored files combined by `rule` (by default the weighted mean), computed from local (mapped) copies
        into a staged file, stored in the global model's format (an ONNX model keeps its graph: the global
        model's file is the template); with Krum's choice, when the rule made one."""
        signature, fmt = layout(model)
        n = len(files)
        template = [model.file_id] if fmt == "onnx" else []

        def combine(paths: list[Path | None], outs: list[Path]) -> KrumChoice | None:
            return rule_of_files(present(paths[:n]), weights, signature, fmt, outs[0], rule, keeper.advanced, field,
                                 paths[n] if template else None)

        choice, stored = await self._computed_files([*files, *template], 1, keeper, combine)
        return stored[0], choice

    async def _private_file(
        self, files: list[UUID], model: Model, keeper: LeaseKeeper, privacy: DifferentialPrivacy,
        rule: AggregationRule, new_round: int,
    ) -> tuple[StoredFile, PrivateRound]:
        """The round's updates clipped, combined and noised into a new global file (see weights.dp)."""
        signature, fmt = layout(model)
        # A seed (tests only) gives every round its own reproducible noise; otherwise the operating system's.
        rng = np.random.default_rng(secrets.randbits(128) if privacy.seed is None else [privacy.seed, new_round])

        def combine(paths: list[Path | None], outs: list[Path]) -> PrivateRound:
            current, *updates = present(paths)
            return private_of_files(current, updates, signature, fmt, outs[0], privacy, rule, rng, keeper.advanced,
                                    "model_file", current if fmt == "onnx" else None)

        private, stored = await self._computed_files([model.file_id, *files], 1, keeper, combine)
        return stored[0], private

    async def _optimize(
        self, model: Model, combined: StoredFile, optimizer: ServerOptimizer, keeper: LeaseKeeper,
    ) -> tuple[StoredFile, StoredFile, StoredFile, OptimizerStep]:
        """One server-optimizer step from the current global model towards the combined update: the new global
        file, m, v (from the model's stored state, zero before the first step) and the step it took."""
        lr, beta1, beta2, tau = optimizer.resolved()
        step = OptimizerStep(optimizer.name, lr, beta1, beta2, tau, model.optimizer_steps + 1)
        signature, fmt = layout(model)

        def move(paths: list[Path | None], outs: list[Path]) -> None:
            current, update = present(paths[:2])
            m, v = paths[2:]
            optimizer_files(current, update, m, v, signature, fmt, step, outs[0], outs[1], outs[2], keeper.advanced,
                            current if fmt == "onnx" else None)

        inputs = [model.file_id, combined.file_id, model.optimizer_m_file_id, model.optimizer_v_file_id]
        _, (new, new_m, new_v) = await self._computed_files(inputs, 3, keeper, move)
        return new, new_m, new_v, step

    async def _drop(self, created: list[StoredFile]) -> None:
        for stored in created:
            await self._files.delete(stored.file_id)

    async def _aggregate_updates(
        self, training: Training, model: Model, fields: plans.Fields, effects: Effects, created: list[StoredFile],
        keeper: LeaseKeeper, arrived: Arrivals | None = None,
    ) -> None:
        round_ = training.round
        new_round = round_ + 1
        began = time.perf_counter()
        # Round participants only (an upload whose confirmation failed may be stored a moment before it is
        # removed again), matched here: more than `$in` can carry.
        taking_part = set(training.round_participants)
        if arrived is not None and taking_part <= arrived.keys() and taking_part <= set(training.participants):
            # Each participant's update was read before the claim: one per participant (a unique index), never
            # changed, and none removed while the round is claimed, so reading them again finds the same. (Only
            # an upload whose user left the training before the claim can have been withdrawn since: re-read.)
            stored = [arrived[user] for user in sorted(taking_part)]  # UUIDs sort as MongoDB sorts them
        else:
            stored = [raw async for raw in Update.get_pymongo_collection().find(
                {"training": training.id, "round": round_}).sort("user", 1) if raw["user"] in taking_part]
        updates = [Update.model_validate(raw) for raw in stored]
        if not updates:
            raise ValueError(f"no stored updates for round {round_}")
        period = plans.option(training, "daisy_chain_period", 0)
        aggregate = period == 0 or new_round % period == 0 or new_round >= training.target_num_updates
        keep = plans.option(training, "keep_local_models", False)
        chain: list[ChainLink] = []
        if aggregate:
            rule = plans.aggregation_rule(training)
            privacy = plans.differential_privacy(training)
            record: dict[str, Any] = {}
            if privacy is None:
                stored, choice = await self._mean_file([update.file_id for update in updates],
                                                       [update.sample_size for update in updates], model, keeper,
                                                       "model_file", rule)
                record = krum_record(choice, updates)
            else:
                stored, private = await self._private_file([update.file_id for update in updates], model, keeper,
                                                           privacy, rule, new_round)
                record = private_record(private, updates, privacy, plans.aggregations_by(training.options, new_round))
            created.append(stored)
            moved = None
            if (optimizer := plans.server_optimizer(training)) is not None:
                combined = stored
                stored, m_file, v_file, step = await self._optimize(model, combined, optimizer, keeper)
                created.extend([stored, m_file, v_file])
                moved = (m_file, v_file, step.step)
                await self._files.delete(combined.file_id)  # an intermediate: nothing names it
                created.remove(combined)
            effects.sync_model(model.id, new_round, stored, moved)
            if evaluation := plans.option(training, "evaluation"):
                effects.evaluate(model.id, new_round, stored, UUID(evaluation["dataset"]))
            effects.event("aggregated", round_, updates=len(updates),
                          samples=sum(update.sample_size for update in updates),
                          users=[str(update.user) for update in updates], arrivals=arrivals(updates),
                          size=stored.size, sha256=stored.sha256, seconds=round(time.perf_counter() - began, 3),
                          rule=rule.rule, **record,
                          **({} if moved is None else {"optimizer": optimizer.name, "optimizer_step": moved[2]}))
        else:
            chain = daisy_chain(updates, list(training.participants), self._rng)
            effects.sync_model(model.id, new_round, None)
            effects.event("daisy_chained", round_, updates=len(updates), seconds=round(time.perf_counter() - began, 3),
                          chain={str(link.user): str(link.model) for link in chain}, arrivals=arrivals(updates))
        plans.after_updates(training, fields, effects, new_round, aggregate, chain)
        # Clean-up last, so the notifications above are delivered without waiting for it.
        if aggregate:
            effects.drop_file(model.file_id)
            if plans.server_optimizer(training) is not None:
                for replaced in (model.optimizer_m_file_id, model.optimizer_v_file_id):
                    if replaced is not None:
                        effects.drop_file(replaced)
        if not keep:
            # Without a daisy chain every earlier round's updates were deleted when it was aggregated: this
            # round's are all there are.
            known = [update.file_id for update in updates] if period == 0 else None
            effects.drop_local_files(new_round if aggregate else round_, known)

    async def _aggregate_moments(
        self, training: Training, model: Model, fields: plans.Fields, effects: Effects, created: list[StoredFile],
        keeper: LeaseKeeper,
    ) -> None:
        taking_part = set(training.round_participants)  # as in `_aggregate_updates`
        stats = [SwagStatistic.model_validate(raw) async for raw in SwagStatistic.get_pymongo_collection().find(
            {"training": training.id, "round": training.round}).sort("user", 1) if raw["user"] in taking_part]
        if not stats:
            raise ValueError(f"no stored SWAG statistics for round {training.round}")
        weights = [stat.sample_size for stat in stats]
        for which in ("first", "second"):
            files = [stat.first_file_id if which == "first" else stat.second_file_id for stat in stats]
            created.append((await self._mean_file(files, weights, model, keeper, f"{which}_moment_file"))[0])
        effects.store_moments(model.id, created[0], created[1])
        effects.event("swag_aggregated", training.round, statistics=len(stats), arrivals=[
            {"user": str(stat.user), "statistic": str(stat.id), "at": iso_z(stat.created_at),
             "sample_size": stat.sample_size, "sha256": stat.sha256} for stat in stats])
        plans.after_swag(training, fields, effects)

    # -- steps caused from outside ------------------------------------------------------------

    async def fail_running(self, training_id: UUID, detail: dict[str, Any]) -> None:
        """Move a running training to E (e.g. notifications could not be delivered)."""
        raw = await Training.get_pymongo_collection().find_one({"_id": training_id})
        if raw is None:
            return
        training = Training.model_validate(raw)
        if training.state in RUNNING:
            await self._fail(training, detail)

    async def remove_participant(self, training_id: UUID, user: UUID, detail: dict[str, Any]) -> bool:
        """Remove a participant (e.g. it refused a round notification) and tell the actor."""
        raw = await Training.get_pymongo_collection().find_one({"_id": training_id})
        if raw is None:
            return False
        training = Training.model_validate(raw)
        if training.state not in RUNNING or user not in training.participants:
            return False
        effects = plans.new_effects()
        effects.event("participant_removed", training.round, user, **detail)
        effects.notify("CLIENT_REMOVED", [training.actor], {"client_uuid": str(user), **detail}, False)
        written = await plans.write_step(
            training, {"state": {"$in": [str(s) for s in RUNNING]}, "participants": user}, {}, effects,
            {"$pull": {"participants": user, "round_participants": user}},
        )
        if written is not None:
            await self.apply_effects(written)
            self.kick(training_id)
        return written is not None
