"""Training schemas."""

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AliasChoices, ConfigDict, Field, StrictInt, StrictStr
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from fltraining.schemas.common import PublicModel, RequestModel, UtcDatetime
from fltraining.states import AggregationMethod, Phase, TrainingState, UncertaintyMethod

MAX_TARGET = 1_000_000
MAX_CLIENTS_PER_REQUEST = 1_000

TargetNumUpdates = Annotated[StrictInt, Field(ge=1, le=MAX_TARGET)]
MetricNames = Annotated[
    list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=100)
]
ClientIds = Annotated[list[UUID], Field(max_length=MAX_CLIENTS_PER_REQUEST)]
Options = dict[str, Any]


class TrainingCreate(RequestModel):
    """Body of POST /api/trainings/."""

    model_id: UUID
    target_num_updates: TargetNumUpdates
    metric_names: MetricNames = Field(default_factory=list)
    aggregation_method: AggregationMethod = AggregationMethod.FED_AVG
    uncertainty_method: UncertaintyMethod = UncertaintyMethod.NONE
    options: Options = Field(default_factory=dict)
    clients: ClientIds = Field(default_factory=list)


def _without_defaults(schema: dict[str, Any]) -> None:
    """Drop the `null` defaults from a PATCH body's JSON schema: a field left out stays unchanged."""
    for field in schema["properties"].values():
        field.pop("default", None)


class TrainingPatch(RequestModel):
    """Body of PATCH /api/trainings/{id}/; `options` replaces the whole object."""

    model_config = ConfigDict(json_schema_extra=_without_defaults)

    # None means "not sent"; the service refuses an explicit null (400), so the spec does not offer it.
    target_num_updates: TargetNumUpdates | SkipJsonSchema[None] = None
    metric_names: MetricNames | SkipJsonSchema[None] = None
    aggregation_method: AggregationMethod | SkipJsonSchema[None] = None
    uncertainty_method: UncertaintyMethod | SkipJsonSchema[None] = None
    options: Options | SkipJsonSchema[None] = None


class ClientsBody(RequestModel):
    """Body of PUT/DELETE /api/trainings/{id}/clients/."""

    clients: ClientIds


class TrainingPublic(PublicModel):
    """A training as clients see it (built from a Document or a raw stored document)."""

    id: UUID = Field(validation_alias=AliasChoices("id", "_id"))
    model: UUID
    actor: UUID
    participants: list[UUID]
    state: TrainingState
    target_num_updates: int
    last_update: UtcDatetime
    created_at: UtcDatetime
    uncertainty_method: UncertaintyMethod
    aggregation_method: AggregationMethod
    options: dict[str, Any]
    metric_names: list[str]
    locked: bool
    state_detail: dict[str, Any] | None
    round: int = 0
    phase: Phase | None = None
    round_deadline: UtcDatetime | None = None


# Stored fields a public training is made of, with the default a document written before the field
# existed stands for.
PUBLIC_DEFAULTS: dict[str, Any] = {"round": 0, "phase": None, "round_deadline": None}
PUBLIC_FIELDS = tuple(name for name in TrainingPublic.model_fields if name != "id")


def public_training(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored training as its public JSON object, without building a model:
    the `$jsonSchema` validator already guarantees the stored shape (datetimes and UUIDs left to the encoder)."""
    public = {"id": raw["_id"]}
    for name in PUBLIC_FIELDS:
        public[name] = raw.get(name, PUBLIC_DEFAULTS.get(name))
    return public


class PrivacyReport(PublicModel):
    """A differentially private training's budget so far: ε after the rounds aggregated (null: no noise)."""

    epsilon: float | None
    delta: float
    rounds: int
    clip_norm: float
    noise_multiplier: float


class TrainingDetail(TrainingPublic):
    """GET /api/trainings/{id}/: the training plus what the current round and phase wait for."""

    local_models_arrived: int
    local_models_expected: int
    # Only a differentially private training's detail has it (absent, not null, for the others).
    privacy: PrivacyReport | None = Field(default=None, exclude_if=lambda value: value is None)


class TrainingCreated(PublicModel):
    """Answer to POST /api/trainings/."""

    detail: str = "Training created successfully!"
    training_id: UUID


Ordering = Literal["last_update", "-last_update", "created_at", "-created_at"]


_CODES = "|".join(state.value for state in TrainingState)
# A state item is a code or codes joined by commas (the contract allows `state=I,O`); nothing else, no empty
# item.
STATE_LIST_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"anyOf": [{"type": "string", "enum": [state.value for state in TrainingState]},
                        {"type": "string", "pattern": f"^(?:{_CODES})(?:,(?:{_CODES}))+$"}]},
    "description": "State codes, the parameter repeated (state=I&state=O) or comma-separated (state=I,O); an "
                   "empty item (state=, state=I,) is 400.",
}


class TrainingListQuery(RequestModel):
    """Query of the training lists."""

    state: Annotated[list[TrainingState] | None, WithJsonSchema(STATE_LIST_SCHEMA)] = None
    aggregation_method: AggregationMethod | None = None
    uncertainty_method: UncertaintyMethod | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=10_000_000)
    ordering: Ordering = "-last_update"
