"""Schemas of the round engine's endpoints: contributions, metrics, training models, events."""

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, StrictStr, field_validator

from fltraining.schemas.common import PublicModel, RequestModel, UtcDatetime

Round = Annotated[int, Field(ge=0, le=10_000_000)]
SampleSize = Annotated[int, Field(ge=1, le=2**53)]
MetricName = Annotated[StrictStr, Field(min_length=1, max_length=64)]
MetricValue = Annotated[float, Field(allow_inf_nan=False)]
EVENT_ID_PATTERN = r"^[0-9]{13}-[0-9]{2}-[0-9a-f]{8}$"


class UpdateForm(RequestModel):
    """The text fields of a local model update (multipart; the file is `model_file`)."""

    round: Round
    sample_size: SampleSize
    metric_names: list[MetricName] = Field(default_factory=list, max_length=100)
    metric_values: list[MetricValue] = Field(default_factory=list, max_length=100)


class SwagForm(RequestModel):
    """The text fields of a SWAG statistics upload (files `first_moment_file`, `second_moment_file`)."""

    round: Round
    sample_size: SampleSize


class MetricsBody(RequestModel):
    """Metrics for a model: names and numeric values, paired by position."""

    metric_names: list[MetricName] = Field(max_length=100)
    metric_values: list[MetricValue] = Field(max_length=100)

    @field_validator("metric_values", mode="before")
    @classmethod
    def no_booleans(cls, value: Any) -> Any:
        """JSON true/false are not metric values."""
        if isinstance(value, list) and any(isinstance(item, bool) for item in value):
            raise ValueError("metric values must be numbers")
        return value


class MetricsAccepted(PublicModel):
    """Answer to a metrics upload."""

    detail: str = "Model Metrics Upload Accepted"
    model_id: UUID


class MetricPublic(PublicModel):
    """One stored metric value, as DLR's metric objects (its web frontend draws charts from `value_float`)."""

    id: UUID
    model: UUID
    identifier: str | None = None  # DLR's free-form label; fltraining records none
    key: str
    value_float: float
    value_binary: None = None  # DLR keeps pickled objects here; fltraining stores numbers only
    step: int
    reporter: UUID | None  # null: the service's own evaluation of the global model
    created_at: UtcDatetime

    @classmethod
    def of(cls, raw: dict[str, Any]) -> "MetricPublic":
        """The public form of a stored metric document."""
        return cls(id=raw["_id"], model=raw["model"], key=raw["key"], value_float=raw["value"], step=raw["step"],
                   reporter=raw["reporter"], created_at=raw["created_at"])


class TrainingModelEntry(PublicModel):
    """A model of a training: the global model, or a stored local update (no weights)."""

    id: UUID
    type: Literal["GLOBAL", "LOCAL"]
    round: int
    owner: UUID
    size: int
    sha256: str
    created_at: UtcDatetime
    base_model: UUID | None = None
    sample_size: int | None = None


class EventsQuery(RequestModel):
    """Query of the events endpoint."""

    after: Annotated[str, Field(pattern=EVENT_ID_PATTERN)] | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class EventPublic(PublicModel):
    """One entry of a training's audit trail."""

    id: str
    training: UUID
    type: str
    round: int
    at: UtcDatetime
    user: UUID | None
    data: dict[str, Any]


class Arrival(PublicModel):
    """One round participant's contribution to the current phase: who, when, how much."""

    user: UUID
    at: UtcDatetime | None  # test metrics record who, not when
    sample_size: int | None = None
    size: int | None = None
    sha256: str | None = None


class RoundProgress(PublicModel):
    """The current round of a training: who takes part, who has arrived (and when), who is still expected."""

    training: UUID
    state: str
    round: int
    phase: str | None
    round_deadline: UtcDatetime | None
    participants: list[UUID]
    expected_count: int
    arrived_count: int
    arrived: list[Arrival]
    expected: list[UUID]
