"""A request's `model_input`: read from JSON or a file, checked against the model and its graph."""

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from fltraining.errors import InvalidInput
from fltraining.inference.graphs import InputSpec
from fltraining.weights.formats import UnsupportedModelFormat, load_tensors

NPY_MAGIC = b"\x93NUMPY"
NUMERIC_KINDS = "biuf"


def from_json(value: Any, max_elements: int) -> np.ndarray:
    """A nested JSON list of numbers as an array (400 for ragged, non-numeric or over-large input)."""
    if not isinstance(value, list) or not value:
        raise InvalidInput("model_input must be a non-empty (nested) list of numbers.")
    # The body's size bounds what NumPy is given here; the element count is checked on the result.
    try:
        array = np.array(value)
    except (ValueError, OverflowError):
        raise InvalidInput("model_input is ragged: every row must have the same length.") from None
    if array.dtype.kind not in NUMERIC_KINDS:
        raise InvalidInput("model_input must hold only numbers (and rows of equal length).")
    if array.size > max_elements:
        raise InvalidInput(f"model_input holds more than {max_elements} numbers.")
    return array


def from_file(data: bytes, max_elements: int) -> np.ndarray:
    """One array from a `.npy`, `.npz` or safetensors file (no pickles), 400 otherwise."""
    if data.startswith(NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise InvalidInput(f"model_input is not a readable .npy file ({str(error)[:200]}).") from None
    else:
        try:
            tensors = load_tensors(data, max_tensor_bytes=max_elements * 8)
        except UnsupportedModelFormat as error:
            raise InvalidInput(f"model_input must be a .npy, .npz or safetensors file holding one array "
                               f"({error.reason}).") from None
        if len(tensors) != 1:
            raise InvalidInput(f"model_input must hold one array; the file holds {len(tensors)}.")
        array = next(iter(tensors.values()))
    if array.dtype.kind not in NUMERIC_KINDS:
        raise InvalidInput(f"model_input has dtype {array.dtype}; send numbers.")
    if array.size > max_elements:
        raise InvalidInput(f"model_input holds more than {max_elements} numbers.")
    if array.size == 0:
        raise InvalidInput("model_input is empty.")
    return array


def _shape_problem(shape: tuple[int, ...], expected: Sequence[int | None]) -> str | None:
    if len(shape) != len(expected):
        return f"has {len(shape)} dimensions, expected {len(expected)}"
    for axis, (size, wanted) in enumerate(zip(shape, expected)):
        if wanted is not None and size != wanted:
            return f"has size {size} in dimension {axis}, expected {wanted}"
    return None


def for_graph(array: np.ndarray, spec: InputSpec, input_shape: Sequence[int | None] | None) -> np.ndarray:
    """The input as the graph takes it: shape as recorded for the model and declared by the graph,
    finite, converted to the graph's element type without losing values (400 naming what is wrong)."""
    for expected, whose in ((input_shape, "the model's input_shape"), (spec.shape, "the graph's input")):
        if expected is not None and (problem := _shape_problem(array.shape, expected)):
            raise InvalidInput(f"model_input {problem} ({whose} is {list(expected)}).")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput("model_input holds NaN or infinite values.")
    target = spec.dtype
    if array.dtype == target:
        return np.ascontiguousarray(array)
    if target.kind == "f":
        if array.dtype.kind == "b":
            raise InvalidInput(f"model_input holds booleans; the graph takes {target}.")
        with np.errstate(over="ignore"):
            converted = array.astype(target)
        if not np.isfinite(converted).all():
            raise InvalidInput(f"model_input holds values too large for {target}.")
        return converted
    if target.kind in "iu":
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise InvalidInput(f"model_input holds fractions; the graph takes {target}.")
        info = np.iinfo(target)
        if array.dtype.kind != "b" and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"model_input holds values outside the range of {target}.")
        return array.astype(target)
    if target.kind == "b" and array.dtype.kind in "iu" and np.isin(array, (0, 1)).all():
        return array.astype(target)
    raise InvalidInput(f"model_input has dtype {array.dtype}; the graph takes {target}.")
