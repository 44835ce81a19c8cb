"""Model schemas."""

import json
from typing import Annotated
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
    created_at: UtcDatetime


class ModelUploadAccepted(PublicModel):
    """Answer to a model upload."""

    detail: str = "Model Upload Accepted"
    model_id: UUID
