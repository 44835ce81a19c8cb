"""A model's tensor signature: the names, shapes and dtypes every update must share."""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from fltraining.errors import InvalidInput


class TensorSpec(NamedTuple):
    """The shape and dtype name (`float32`, `int64`, `bool`, ...) of one tensor."""

    shape: tuple[int, ...]
    dtype: str


type Signature = dict[str, TensorSpec]


def signature_of(tensors: Mapping[str, np.ndarray]) -> Signature:
    """The signature of a set of tensors, in their order."""
    return {name: TensorSpec(tuple(array.shape), array.dtype.name) for name, array in tensors.items()}


def check_matches(
    expected: Mapping[str, TensorSpec], actual: Mapping[str, TensorSpec], field: str = "model_file"
) -> None:
    """Raise InvalidInput naming the first tensor of `actual` that differs from `expected` (order aside)."""
    # Order is not compared: safetensors files list tensors sorted, PyTorch in module order.
    for name, spec in expected.items():
        if name not in actual:
            _mismatch(
                field,
                name,
                f"tensor {name!r} is missing (expected shape {list(spec.shape)}, dtype {spec.dtype})",
                "tensor_missing",
            )
        found = actual[name]
        if found.shape != spec.shape:
            _mismatch(
                field,
                name,
                f"tensor {name!r} has shape {list(found.shape)}, expected {list(spec.shape)}",
                "tensor_shape",
            )
        if found.dtype != spec.dtype:
            _mismatch(
                field, name, f"tensor {name!r} has dtype {found.dtype}, expected {spec.dtype}", "tensor_dtype"
            )
    for name in actual:
        if name not in expected:
            _mismatch(field, name, f"tensor {name!r} is not in the global model", "tensor_unexpected")


def _mismatch(field: str, name: str, msg: str, kind: str) -> None:
    raise InvalidInput(
        f"The model file does not match the global model: {msg}.",
        [{"loc": [field, name], "msg": msg, "type": kind}],
    )


def to_documents(signature: Mapping[str, TensorSpec]) -> list[dict[str, Any]]:
    """The signature as `{"name", "shape", "dtype"}` documents (tensor names hold dots: no MongoDB keys)."""
    return [
        {"name": name, "shape": list(spec.shape), "dtype": spec.dtype} for name, spec in signature.items()
    ]


def from_documents(documents: list[dict[str, Any]]) -> Signature:
    """The signature stored by `to_documents`."""
    return {doc["name"]: TensorSpec(tuple(doc["shape"]), doc["dtype"]) for doc in documents}
