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
        """Multipart sends the shape as JSON text; "None"/"null"/"" mean no shape."""
        if isinstance(value, str):
            if value.strip() in {"", "None", "null"}:
                return None
            try:
                return json.loads(value.replace("None", "null"))
            except json.JSONDecodeError as error:
                raise ValueError("input_shape must be a JSON list of integers or null") from error
        return value


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
