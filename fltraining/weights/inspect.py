"""What the service records about a model file, and the check every update passes."""

from dataclasses import dataclass, field
from typing import Any

from fltraining.errors import InvalidInput
from fltraining.weights.formats import (
    MAX_TENSOR_BYTES,
    Source,
    UnsupportedModelFormat,
    detect_format,
    file_buffer,
    read_signature,
    refusing,
)
from fltraining.weights.onnx_files import describe_onnx
from fltraining.weights.signature import Signature, check_matches, from_documents, signature_of, to_documents


@dataclass(frozen=True)
class FileFacts:
    """A model file's accepted format and tensor signature, or why it cannot take part in a training."""

    format: str | None
    tensors: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None
    graph_digest: str | None = None  # an ONNX file's computation (see `onnx_files.graph_digest`)


def inspect_file(source: Source) -> FileFacts:
    """Read a file's format and signature (a path is mapped, not read); an unsupported file is described."""
    try:
        data = file_buffer(source)
        if detect_format(data) == "onnx":
            with refusing("onnx file"):  # one parse for the signature and the checks
                tensors, digest = describe_onnx(data, MAX_TENSOR_BYTES)
            return FileFacts(format="onnx", tensors=to_documents(signature_of(tensors)), graph_digest=digest)
        fmt, signature = read_signature(data)
    except UnsupportedModelFormat as error:
        return FileFacts(format=None, problem=error.detail)
    return FileFacts(format=fmt, tensors=to_documents(signature))


def check_facts(facts: FileFacts, expected: Signature, field_name: str) -> None:
    """An uploaded file is readable and has the global model's tensors (400 naming the first mismatch)."""
    if facts.format is None:
        raise InvalidInput(facts.problem or "Unsupported model file.")
    check_matches(expected, from_documents(facts.tensors), field_name)
