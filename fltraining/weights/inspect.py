"""What the service records about a model file, and the check every update passes."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fltraining.weights.formats import UnsupportedModelFormat, detect_format, load_tensors
from fltraining.weights.signature import Signature, check_matches, signature_of, to_documents


@dataclass(frozen=True)
class FileFacts:
    """A model file's accepted format and tensor signature, or why it cannot take part in a training."""

    format: str | None
    tensors: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


def inspect_file(data: bytes | bytearray | memoryview) -> FileFacts:
    """Read a file's format and signature; an unsupported file is described, not refused."""
    try:
        fmt = detect_format(data)
        tensors = load_tensors(data)
    except UnsupportedModelFormat as error:
        return FileFacts(format=None, problem=error.detail)
    return FileFacts(format=fmt, tensors=to_documents(signature_of(tensors)))


def load_matching(
    data: bytes | bytearray | memoryview, expected: Signature, field_name: str
) -> dict[str, np.ndarray]:
    """Load an uploaded file and check it has the global model's tensors (400 naming the first mismatch)."""
    tensors = load_tensors(data)
    check_matches(expected, signature_of(tensors), field_name)
    return tensors
