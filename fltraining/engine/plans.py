"""What each step of a running training writes: the fields it sets and the effects it causes.

Every function here fills `fields` and `effects` from the training as read; the caller writes
them in one conditional update (`write_step`), so a step either happens whole or not at all.
"""

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter
from pymongo import ReturnDocument

from fltraining.clock import utcnow
from fltraining.documents import ChainLink, Training
from fltraining.engine.effects import Effects
from fltraining.options import (
    DEFAULT_FEDPROX_MU,
    AggregationRule,
    DifferentialPrivacy,
    MeanRule,
    ServerOptimizer,
)
from fltraining.privacy import epsilon, shown
from fltraining.states import (
    TRANSITIONS,
    AggregationMethod,
    Phase,
    TrainingState,
    Transition,
    UncertaintyMethod,
)

Fields = dict[str, Any]


def expected_users(training: Training) -> list[UUID]:
    """The round participants who are still participants (a removal may race a round start)."""
    return still_taking_part(training.round_participants, training.participants)


def expected_count(raw: dict[str, Any]) -> int:
    """How many round participants a stored training still expects in its current phase."""
    return len(still_taking_part(raw.get("round_participants", []), raw["participants"]))


def still_taking_part(round_participants: Iterable[UUID], participants: Iterable[UUID]) -> list[UUID]:
    """`expected_users` on stored fields: the round participants that are still participants."""
    current = set(participants)
    return [user for user in round_participants if user in current]


def missing_users(training: Training, arrived: set[UUID]) -> list[UUID]:
    """Round participants whose contribution to the current phase has not arrived."""
    return [user for user in expected_users(training) if user not in arrived]


def option(training: Training, name: str, default: Any = None) -> Any:
    """A training option as stored (validated at creation), or its default."""
    value = training.options.get(name)
    return default if value is None else value


_RULE: TypeAdapter[AggregationRule] = TypeAdapter(AggregationRule)


def aggregation_rule(training: Training) -> AggregationRule:
    """How a round's updates are combined (`options.aggregation`, validated at creation; the mean by default)."""
    stored = option(training, "aggregation")
    return MeanRule(rule="mean") if stored is None else _RULE.validate_python(stored)


def server_optimizer(training: Training) -> ServerOptimizer | None:
    """`options.server_optimizer` (validated at creation), or None: the combined update replaces the model."""
    stored = option(training, "server_optimizer")
    return None if stored is None else ServerOptimizer.model_validate(stored)


def differential_privacy(training: Training) -> DifferentialPrivacy | None:
    """`options.differential_privacy` (validated at creation), or None."""
    stored = option(training, "differential_privacy")
    return None if stored is None else DifferentialPrivacy.model_validate(stored)


def aggregations_by(options: dict[str, Any], round_: int) -> int:
    """How many rounds have aggregated once `round_` rounds are done (FedDC aggregates every period-th)."""
    period = options.get("daisy_chain_period") or 0
    return -(-round_ // period) if period > 0 else round_


def privacy_spent(privacy: DifferentialPrivacy, rounds: int) -> dict[str, Any]:
    """ε spent after `rounds` private aggregations (None: no noise, no privacy), at δ."""
    return {"epsilon": shown(epsilon(privacy.noise_multiplier, rounds, privacy.delta)), "delta": privacy.delta,
            "rounds": rounds}


def privacy_report(options: dict[str, Any], round_: int) -> dict[str, Any] | None:
    """What the training's detail shows of its privacy: ε spent so far and the mechanism's parameters."""
    stored = options.get("differential_privacy")
    if stored is None:
        return None
    privacy = DifferentialPrivacy.model_validate(stored)
    return {**privacy_spent(privacy, aggregations_by(options, round_)), "clip_norm": privacy.clip_norm,
            "noise_multiplier": privacy.noise_multiplier}


def _deadline(training: Training, at: datetime) -> datetime | None:
    seconds = option(training, "round_timeout_seconds")
    return None if seconds is None else at + timedelta(seconds=seconds)


def move_state(training: Training, move: Transition, fields: Fields) -> None:
    """Apply a state-table move to the fields (the caller's filter pins the state it starts from)."""
    sources, target = TRANSITIONS[move]
    if training.state not in sources:
        raise ValueError(f"{move} cannot start from state {training.state}")
    fields["state"] = str(target)


def _waiting(training: Training, fields: Fields, phase: Phase, at: datetime) -> None:
    fields.update(phase=str(phase), round_arrived=[], round_deadline=_deadline(training, at),
                  locked=False, lease_owner=None, lease_until=None)


def begin_round(training: Training, fields: Fields, effects: Effects, round_: int, chain: list[ChainLink]) -> None:
    """Round `round_` starts: every participant is a round participant and is told to train."""
    participants = list(training.participants)
    _waiting(training, fields, Phase.UPDATES, effects.at)
    fields.update(round=round_, round_participants=participants, chain=[link.model_dump() for link in chain])
    body: dict[str, Any] = {"round": round_, "global_model_uuid": str(training.model)}
    if training.aggregation_method == AggregationMethod.FED_PROX:
        body["fedprox_mu"] = option(training, "fedprox_mu", DEFAULT_FEDPROX_MU)
    per_user = {link.user: {"global_model_uuid": str(link.model)} for link in chain}
    effects.notify("UPDATE_ROUND_START", participants, body, True, per_user)
    effects.event("round_started", round_, participants=[str(user) for user in participants],
                  chain={str(link.user): str(link.model) for link in chain})


def begin_testing(training: Training, fields: Fields, effects: Effects, round_: int) -> None:
    """The round participants test the new global model."""
    _waiting(training, fields, Phase.TESTING, effects.at)
    users = expected_users(training)
    effects.notify("MODEL_TEST_ROUND", users, {"round": round_, "global_model_uuid": str(training.model)}, True)
    effects.event("testing_started", round_)


def begin_swag(training: Training, fields: Fields, effects: Effects, round_: int) -> None:
    """State S: the round participants send SWAG statistics for the new global model."""
    move_state(training, Transition.SWAG_ROUND, fields)
    _waiting(training, fields, Phase.SWAG, effects.at)
    users = expected_users(training)
    effects.notify("SWAG_ROUND_START", users, {"round": round_, "global_model_uuid": str(training.model)}, True)
    effects.event("state_changed", round_, state="S")


def finish(training: Training, fields: Fields, effects: Effects, round_: int) -> None:
    """State C: everyone involved is told."""
    move_state(training, Transition.COMPLETE, fields)
    fields.update(phase=None, round_deadline=None, locked=False, lease_owner=None, lease_until=None)
    effects.notify("TRAINING_FINISHED", [*training.participants, training.actor],
                   {"global_model_uuid": str(training.model)}, False)
    effects.event("state_changed", round_, state="C")


def fail(training: Training, fields: Fields, effects: Effects, move: Transition, detail: dict[str, Any]) -> None:
    """State E with the reason in state_detail; nothing runs any more."""
    move_state(training, move, fields)
    fields.update(phase=None, round_deadline=None, locked=False, lease_owner=None, lease_until=None,
                  state_detail=detail)
    # The event's `user` is a user id field: a detail naming a user (notification_failed) fills it.
    data = {key: value for key, value in detail.items() if key != "user"}
    user = detail.get("user")
    effects.event("state_changed", training.round, None if user is None else UUID(str(user)), state="E", **data)


def _skip_tests(training: Training) -> bool:
    return bool(option(training, "skip_model_tests", False))


def _next_round_or_finish(training: Training, fields: Fields, effects: Effects, round_: int, chain: list[ChainLink]) -> None:
    if round_ >= training.target_num_updates:
        finish(training, fields, effects, round_)
    else:
        begin_round(training, fields, effects, round_, chain)


def after_updates(
    training: Training, fields: Fields, effects: Effects, new_round: int, aggregated: bool, chain: list[ChainLink]
) -> None:
    """After a round's updates were aggregated (or, in FedDC, passed on): SWAG, tests, next round or C."""
    fields["round"] = new_round
    training = training.model_copy(update={"round": new_round})
    if aggregated and training.uncertainty_method == UncertaintyMethod.SWAG:
        begin_swag(training, fields, effects, new_round)
    elif aggregated and not _skip_tests(training):
        begin_testing(training, fields, effects, new_round)
    else:
        _next_round_or_finish(training, fields, effects, new_round, chain)


def after_swag(training: Training, fields: Fields, effects: Effects) -> None:
    """After the SWAG moments were aggregated: back to O, then tests, next round or C."""
    move_state(training, Transition.RESUME, fields)
    resumed = training.model_copy(update={"state": TrainingState.ONGOING})
    if _skip_tests(training):
        _next_round_or_finish(resumed, fields, effects, training.round, [])
    else:
        begin_testing(resumed, fields, effects, training.round)


def after_testing(training: Training, fields: Fields, effects: Effects) -> None:
    """After the test phase: next round or C."""
    arrived = set(training.round_arrived)
    effects.event("testing_completed", training.round,
                  missing=[str(user) for user in missing_users(training, arrived)])
    _next_round_or_finish(training, fields, effects, training.round, [])


async def write_step(
    training: Training, condition: dict[str, Any], fields: Fields, effects: Effects,
    extra: dict[str, Any] | None = None,
) -> Training | None:
    """One conditional update of the training: fields, effects and version together; None if the condition failed."""
    update: dict[str, Any] = {"$set": {**fields, "last_update": effects.at}, "$inc": {"version": 1}}
    if effects.items:
        update["$push"] = {"effects": {"$each": effects.items}}
        update["$set"]["effects_pending"] = True
    for operator, value in (extra or {}).items():
        update[operator] = value
    written = await Training.get_pymongo_collection().find_one_and_update(
        {"_id": training.id, **condition}, update, return_document=ReturnDocument.AFTER
    )
    return None if written is None else Training.model_validate(written)


def new_effects() -> Effects:
    """An empty effect list for a step happening now."""
    return Effects(utcnow())
