"""Trainings: creation with the daisy-chain rule, access, participants and state changes."""

import math
from collections.abc import Callable
from typing import Any
from uuid import UUID

from bson.binary import Binary
from pydantic import ValidationError
from pymongo.errors import DuplicateKeyError

from fltraining.documents import Dataset, Model, Training, User
from fltraining.engine.plans import (
    Fields,
    aggregation_rule,
    aggregations_by,
    begin_round,
    differential_privacy,
    fail,
    move_state,
    new_effects,
    option,
    write_step,
)
from fltraining.errors import Conflict, InvalidInput, NotFound, PermissionDenied, PreconditionFailed
from fltraining.options import (
    KrumRule,
    MultiKrumRule,
    TrainingOptions,
    daisy_chained_target,
    find_value_problems,
)
from fltraining.privacy import epsilon
from fltraining.schemas.common import iso_z, public_errors
from fltraining.schemas.trainings import TrainingCreate, TrainingListQuery, TrainingPatch
from fltraining.services.models import ModelService
from fltraining.services.users import UserService
from fltraining.states import PARTICIPANTS_EDITABLE, PATCHABLE, TRANSITIONS, TrainingState, Transition
from fltraining.storage.queries import count_matching, find_document, reading_raw_uuids

PATCH_RETRIES = 8


def check_privacy_budget(training: Training) -> None:
    """409 when the planned rounds would spend more ε than `target_epsilon` allows, naming the ε they reach."""
    privacy = differential_privacy(training)
    if privacy is None or privacy.target_epsilon is None:
        return
    rounds = aggregations_by(training.options, training.target_num_updates)
    reached = epsilon(privacy.noise_multiplier, rounds, privacy.delta)
    if reached > privacy.target_epsilon:
        shown_value = "infinite (no noise)" if math.isinf(reached) else f"{reached:.4g}"
        raise Conflict(f"options.differential_privacy: {rounds} rounds with noise_multiplier "
                       f"{privacy.noise_multiplier} reach ε = {shown_value} at δ = {privacy.delta}, above "
                       f"target_epsilon {privacy.target_epsilon}: add noise or plan fewer rounds.")


def check_rule_satisfiable(training: Training) -> None:
    """409 when the aggregation rule needs more updates than a round of this training may bring."""
    rule = aggregation_rule(training)
    if not isinstance(rule, KrumRule):
        return
    participants = len(training.participants)
    # A round times out into aggregation with as few as `min_updates` updates.
    fewest = min(participants, option(training, "min_updates", participants))
    if fewest < rule.smallest_n():
        raise Conflict(
            f"options.aggregation: {rule.rule} with byzantine = {rule.byzantine}"
            + (f" and select = {rule.select}" if isinstance(rule, MultiKrumRule) else "")
            + f" needs at least {rule.smallest_n()} updates per round; this training may aggregate {fewest} "
            f"({participants} participants" + (f", min_updates {fewest}" if fewest < participants else "") + ").")


class TrainingService:
    """Every training rule; each change is one conditional update on the stored document."""

    def __init__(self, users: UserService, models: ModelService, max_options_depth: int,
                 dp_allow_seed: bool = False) -> None:
        self._dp_allow_seed = dp_allow_seed
        self._users = users
        self._models = models
        self._max_depth = max_options_depth
        self._kick: Callable[[UUID], None] = lambda _: None

    def on_change(self, kick: Callable[[UUID], None]) -> None:
        """Call `kick` with a training's id after a change the round engine should look at."""
        self._kick = kick

    def check_options(self, options: dict[str, Any], loc: str = "options") -> TrainingOptions:
        """Apply the option rules: no operator/path keys, bounded depth, typed known keys."""
        problems = find_value_problems(options, self._max_depth)
        if problems:
            for problem in problems:
                problem["loc"] = [loc, *problem["loc"]]
            raise InvalidInput("Invalid options.", problems)
        try:
            typed = TrainingOptions.model_validate(options)
        except ValidationError as error:
            errors = public_errors(error.errors())
            for item in errors:
                item["loc"] = [loc, *item["loc"]]
            raise InvalidInput("Invalid options.", errors) from error
        privacy = typed.differential_privacy
        if privacy is not None and privacy.seed is not None and not self._dp_allow_seed:
            raise InvalidInput("Invalid options.", [{
                "loc": [loc, "differential_privacy", "seed"], "type": "seed_not_allowed",
                "msg": "a fixed noise seed is for tests only: set FLTRAINING_DP_ALLOW_SEED=true to allow it"}])
        return typed

    async def create(self, actor: User, data: TrainingCreate) -> Training:
        """Create a training in state I; a model already in use is cloned for it."""
        options = self.check_options(data.options)
        try:
            model = await self._models.get(data.model_id)
        except NotFound as error:
            raise InvalidInput(f"Model {data.model_id} not found.") from error
        if model.owner != actor.id:
            raise PermissionDenied()
        await self._check_evaluation(actor.id, model, options)
        participants = await self._users.require_all_exist(data.clients)
        training = Training(
            model=model.id,
            actor=actor.id,
            participants=participants,
            base_target_num_updates=data.target_num_updates,
            target_num_updates=data.target_num_updates,
            metric_names=data.metric_names,
            aggregation_method=data.aggregation_method,
            uncertainty_method=data.uncertainty_method,
            options=data.options,
        )
        in_use = await Training.get_pymongo_collection().find_one({"model": model.id}, {"_id": 1})
        if in_use is None:
            try:
                await training.insert()
                return training
            except DuplicateKeyError:
                pass  # lost the race for the model to a concurrent creation
        # The model belongs to another training: this one gets a clone (seed rule).
        clone = await self._models.clone(model, training.id)
        training.model = clone.id
        try:
            await training.insert()
        except BaseException:
            await self._models.purge(clone)
            raise
        return training

    async def get(self, training_id: UUID) -> Training:
        """One training by id, or 404."""
        training = await find_document(Training, {"_id": training_id})
        if training is None:
            raise NotFound(f"Training {training_id} not found.")
        return training

    async def get_visible(self, user: User, training_id: UUID) -> Training:
        """A training the user is actor or participant of (404, then 403)."""
        training = await self.get(training_id)
        if training.actor != user.id and user.id not in training.participants:
            raise PermissionDenied()
        return training

    async def get_visible_raw(self, user: User, training_id: UUID) -> dict[str, Any]:
        """The stored document of a training the user is actor or participant of (404, then 403), unvalidated:
        the read path builds its answer from it directly (the collection's validator vouches for its shape)."""
        raw = await Training.get_pymongo_collection().find_one({"_id": training_id})
        if raw is None:
            raise NotFound(f"Training {training_id} not found.")
        if raw["actor"] != user.id and user.id not in raw["participants"]:
            raise PermissionDenied()
        return raw

    async def get_as_actor(self, user: User, training_id: UUID) -> Training:
        """A training the user is the actor of (404, then 403)."""
        training = await self.get(training_id)
        if training.actor != user.id:
            raise PermissionDenied("You are not the actor of this training.")
        return training

    async def list_for(
        self, user: User, query: TrainingListQuery, as_participant: bool, projection: dict[str, int] | None = None,
        total: int | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """The user's stored trainings (as actor, or also as participant), filtered and paged, as raw
        documents (with the projection's fields; UUIDs as BSON binaries); a `total` already counted is not
        counted again."""
        who = Binary.from_uuid(user.id)  # the page is read with raw UUIDs (see `reading_raw_uuids`)
        owner: dict[str, Any] = {"$or": [{"actor": who}, {"participants": who}]} if as_participant else {"actor": who}
        filters: dict[str, Any] = {**owner}
        if query.state:
            filters["state"] = {"$in": [str(state) for state in query.state]}
        if query.aggregation_method:
            filters["aggregation_method"] = str(query.aggregation_method)
        if query.uncertainty_method:
            filters["uncertainty_method"] = str(query.uncertainty_method)
        field = query.ordering.lstrip("-")
        direction = -1 if query.ordering.startswith("-") else 1
        collection = Training.get_pymongo_collection()
        cursor = reading_raw_uuids(collection).find(filters, projection).sort([(field, direction), ("_id", direction)])
        items = await cursor.skip(query.offset).limit(query.limit).to_list()
        if 0 < len(items) < query.limit or (query.offset == 0 and not items):
            return items, query.offset + len(items)  # the last page tells the total without a count
        if total is not None:
            return items, total
        return items, await count_matching(collection, filters)

    async def _check_evaluation(self, actor: UUID, model: Model, options: TrainingOptions) -> None:
        """`options.evaluation` names a data set of the actor's, and the model has a graph to run on it (400)."""
        if options.evaluation is None:
            return
        loc = ["options", "evaluation", "dataset"]
        if not await Dataset.get_pymongo_collection().find_one(
                {"_id": options.evaluation.dataset_id, "owner": actor}, {"_id": 1}):
            raise InvalidInput("options.evaluation.dataset names no data set of yours (POST /api/datasets/).",
                               [{"loc": loc, "msg": "unknown data set", "type": "dataset_unknown"}])
        if (await self._models.described(model)).graph_digest is None:
            raise InvalidInput("Server-side evaluation runs the model's ONNX graph, and the model has none: upload "
                               "it as an .onnx file or attach one with PUT /api/models/{id}/graph/.",
                               [{"loc": loc, "msg": "the model has no graph", "type": "graph_missing"}])

    async def patch(self, user: User, training_id: UUID, patch: TrainingPatch, if_match: int | None) -> Training:
        """Change settings in state I; one conditional update per attempt, 412 on a stale If-Match."""
        for field in patch.model_fields_set:
            if getattr(patch, field) is None:
                raise InvalidInput(f"{field} may not be null.", [{"loc": [field], "msg": "may not be null", "type": "none_forbidden"}])
        new_options = None if patch.options is None else self.check_options(patch.options)
        for _ in range(PATCH_RETRIES):
            training = await self.get_as_actor(user, training_id)
            if training.state not in PATCHABLE:
                raise Conflict(f"Training {training_id} is not in state INITIAL!")
            if new_options is not None and new_options.evaluation is not None:
                await self._check_evaluation(training.actor, await self._models.get(training.model), new_options)
            if if_match is not None and training.version != if_match:
                raise PreconditionFailed("The training has changed since the version in If-Match.")
            changes = patch.model_dump(exclude_unset=True, mode="json")
            old_period = training.options.get("daisy_chain_period")
            period = old_period if new_options is None else new_options.daisy_chain_period
            if period != old_period and patch.target_num_updates is None and (period or old_period):
                raise InvalidInput(
                    "Changing options.daisy_chain_period requires target_num_updates in the same PATCH."
                )
            if not changes:
                return training
            fields: Fields = {}
            for field, value in changes.items():
                if field == "target_num_updates":
                    fields["base_target_num_updates"] = value
                    fields["target_num_updates"] = daisy_chained_target(value, period)
                else:
                    fields[field] = value
            patched = await write_step(
                training, {"version": training.version, "state": str(TrainingState.INITIAL)}, fields, new_effects()
            )
            if patched is not None:
                return patched
        raise Conflict("The training kept changing; try again.")

    async def delete(self, user: User, training_id: UUID) -> None:
        """Delete a training (actor only); its model stays."""
        training = await self.get_as_actor(user, training_id)
        await self._models.keep_clone(training)
        await self._models.delete_trainings({"_id": training.id})

    async def add_participants(self, user: User, training_id: UUID, client_ids: list[UUID]) -> None:
        """Add users as participants; idempotent, concurrent calls never lose one another."""
        await self._change_participants(user, training_id, client_ids, "$addToSet", "$each")

    async def remove_participants(self, user: User, training_id: UUID, client_ids: list[UUID]) -> None:
        """Remove users from the participants."""
        await self._change_participants(user, training_id, client_ids, "$pull", "$in")

    async def _change_participants(
        self, user: User, training_id: UUID, client_ids: list[UUID], operator: str, each: str
    ) -> None:
        """One `$addToSet`/`$pull` of known users, applied only while the state allows it (else 409).

        A removal also takes the users out of the current round, which may then be complete.
        """
        training = await self.get_as_actor(user, training_id)
        clients = await self._users.require_all_exist(client_ids)
        change = {"participants": {each: clients}}
        if operator == "$pull":
            change["round_participants"] = {each: clients}
        effects = new_effects()
        if training.state != TrainingState.INITIAL:
            kind = "participants_added" if operator == "$addToSet" else "participants_removed"
            effects.event(kind, training.round, user.id, users=[str(client) for client in clients])
        editable = [str(state) for state in PARTICIPANTS_EDITABLE]
        written = await write_step(training, {"state": {"$in": editable}}, {}, effects, {operator: change})
        if written is None:
            training = await self.get(training_id)
            raise Conflict(f"Participants cannot change in state {training.state}.")
        self._kick(training_id)

    async def start(self, user: User, training_id: UUID) -> Training:
        """I -> O: round 0 begins for the current participants; 409 without participants, a usable model or state I."""
        for _ in range(PATCH_RETRIES):
            training = await self.get_as_actor(user, training_id)
            if training.state != TrainingState.INITIAL:
                raise Conflict(f"Training {training_id} is not in state INITIAL!")
            if not training.participants:
                raise Conflict("At least one participant must be registered!")
            check_rule_satisfiable(training)
            check_privacy_budget(training)
            model = await self._models.described(await self._models.get(training.model))
            if model.format is None:
                raise Conflict(f"The training's model cannot be trained federatedly: {model.format_problem}")
            effects = new_effects()
            fields: Fields = {}
            move_state(training, Transition.START, fields)
            effects.notify("TRAINING_START", training.participants, {"global_model_uuid": str(training.model)}, False)
            effects.event("state_changed", 0, user.id, state="O")
            begin_round(training, fields, effects, 0, [])
            # Pinned to the version read, so the round's participants are exactly those stored.
            started = await write_step(training, {"state": str(TrainingState.INITIAL), "version": training.version},
                                       fields, effects)
            if started is not None:
                self._kick(training_id)
                return started
        raise Conflict("The training kept changing; try again.")

    async def cancel(self, user: User, training_id: UUID) -> Training:
        """Any running state -> E with reason "cancelled"; 409 in C or E. Work in flight is discarded."""
        training = await self.get_as_actor(user, training_id)
        sources, _ = TRANSITIONS[Transition.CANCEL]
        if training.state not in sources:
            raise Conflict(f"Training {training_id} is in state {training.state} and cannot be cancelled.")
        effects = new_effects()
        fields: Fields = {}
        fail(training, fields, effects, Transition.CANCEL,
             {"reason": "cancelled", "by": str(user.id), "at": iso_z(effects.at)})
        cancelled = await write_step(training, {"state": {"$in": [str(s) for s in sources]}}, fields, effects)
        if cancelled is None:
            training = await self.get(training_id)
            raise Conflict(f"Training {training_id} is in state {training.state} and cannot be cancelled.")
        self._kick(training_id)
        return cancelled
