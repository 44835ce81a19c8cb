"""Model schemas."""

import json
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, StrictInt, StrictStr, field_validator

from fltraining.schemas.common import PublicModel, RequestModel, UtcDatetime

# An integer column in DLR's schema; anything past 64 bits could not even be stored (BSON).
Dimension = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


class ModelCreate(RequestModel):
    """The non-file fields of a model upload."""

    name: StrictStr = Field(min_length=1, max_length=256)
    description: StrictStr = Field(default="", max_length=10_000)
    input_shape: list[Dimension | None] | None = Field(default=None, max_length=32)

    @field_validator("input_shape", mode="before")
    @classmethod
    def parse_shape(cls, value: object) -> object:
        """Multipart sends the shape as JSON text once ("None"/"null"/"" mean no shape), or as the field
        repeated once per dimension with "None" for a free one, as DLR's MNIST scripts do."""
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            if len(value) == 1:
                return cls.parse_shape(value[0])
            return [_dimension(item) for item in value]
        if isinstance(value, str):
            if value.strip() in {"", "None", "null"}:
                return None
            try:
                parsed = json.loads(value.replace("None", "null"))
            except json.JSONDecodeError as error:
                raise ValueError("input_shape must be a JSON list of integers or null") from error
            return [parsed] if isinstance(parsed, int) and not isinstance(parsed, bool) else parsed
        return value


def _dimension(text: str) -> int | None:
    """One repeated `input_shape` value: an integer, or None/null/"" for a free dimension."""
    if text.strip() in {"", "None", "null"}:
        return None
    try:
        return int(text.strip())
    except ValueError as error:
        raise ValueError(f"input_shape dimensions must be integers or None, not {text[:32]!r}") from error


class ModelMetadata(PublicModel):
    """Metadata of a stored model."""

    id: UUID
    name: str
    description: str
    owner: UUID
    round: int
    input_shape: list[int | None] | None
    size: int
    sha256: str
    format: str | None = Field(default=None, description="safetensors, npz, torch or onnx; null if unreadable.")
    graph_digest: str | None = Field(
        default=None, description="SHA-256 of the ONNX graph inference runs (null: no graph, no inference).")
    ensemble_members: list[UUID] | None = Field(default=None, description="An ensemble model's members.")
    created_at: UtcDatetime


class ModelUploadAccepted(PublicModel):
    """Answer to a model upload."""

    detail: str = "Model Upload Accepted"
    model_id: UUID


MAX_ENSEMBLE_MEMBERS = 32


class EnsembleCreate(RequestModel):
    """`POST /api/models/ensembles/`: a model made of member models (DLR's mean model)."""

    name: StrictStr = Field(min_length=1, max_length=256)
    description: StrictStr = Field(default="", max_length=10_000)
    models: list[UUID] = Field(min_length=2, max_length=MAX_ENSEMBLE_MEMBERS)

    @field_validator("models")
    @classmethod
    def distinct(cls, value: list[UUID]) -> list[UUID]:
        """Each member once: a member twice would weigh it double in the statistics."""
        if len(set(value)) != len(value):
            raise ValueError("each model may be listed once")
        return value


class InferenceRequest(RequestModel):
    """`POST /api/inference/` as JSON (multipart sends `model_input` as a file)."""

    model_id: UUID
    model_input: list[Any] = Field(min_length=1, description="Nested lists of numbers, batch first.")
    return_format: Literal["json", "binary"] = Field(
        default="json", description="json: a JSON answer; binary: a safetensors file of the same arrays.")


class InferenceForm(RequestModel):
    """`POST /api/inference/` as multipart: these text fields and the `model_input` file (.npy, .npz, safetensors)."""

    model_id: UUID
    return_format: Literal["json", "binary"] = Field(
        default="binary", description="binary (the multipart default, as DLR's): a safetensors file of the "
        "arrays; json: a JSON answer.")


class InferenceAnswer(PublicModel):
    """DLR's inference answer: the prediction and its uncertainty (`outputs`: the raw outputs of one pass)."""

    inference: list[Any]
    uncertainty: dict[str, list[Any]]
    outputs: list[Any] | None = None


class GraphForm(RequestModel):
    """`PUT /api/models/{id}/graph/`: a multipart body whose only part is the `graph_file`."""


class DatasetCreate(RequestModel):
    """The text fields of `POST /api/datasets/` (the file comes as the `dataset_file` part)."""

    name: StrictStr = Field(min_length=1, max_length=256)


class DatasetPublic(PublicModel):
    """A held-out data set for server-side evaluation."""

    id: UUID
    name: str
    owner: UUID
    size: int
    sha256: str
    samples: int
    x_shape: list[int]
    x_dtype: str
    y_shape: list[int]
    y_dtype: str
    created_at: UtcDatetime
