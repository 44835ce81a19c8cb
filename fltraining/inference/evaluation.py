"""Server-side evaluation: a held-out data set (`x`, `y`) and what the global model scores on it."""

from dataclasses import dataclass

import numpy as np

from fltraining.errors import InvalidInput
from fltraining.inference.statistics import in_unit_interval, softmax
from fltraining.weights.formats import (
    Source,
    UnsupportedModelFormat,
    detect_format,
    file_buffer,
    load_tensors,
)

# Probabilities are clipped here before the logarithm, so one confident mistake cannot make the loss infinite.
PROBABILITY_FLOOR = 1e-12


@dataclass(frozen=True)
class DatasetFacts:
    """The shapes and types of a data set file's arrays."""

    samples: int
    x_shape: list[int]
    x_dtype: str
    y_shape: list[int]
    y_dtype: str


def read_dataset(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """The `x` and `y` arrays of an `.npz` data set (no pickles; 400 naming what is wrong)."""
    data = file_buffer(source)
    try:
        if len(data) == 0 or detect_format(data) != "npz":
            raise InvalidInput("dataset_file must be an .npz file holding the arrays x and y.")
        arrays = load_tensors(data)
    except UnsupportedModelFormat as error:
        raise InvalidInput(f"dataset_file must be an .npz file holding the arrays x and y ({error.reason}).") from None
    if set(arrays) != {"x", "y"}:
        raise InvalidInput(f"dataset_file must hold exactly the arrays x and y, not {sorted(arrays)[:10]}.")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
        raise InvalidInput(f"x and y must hold the same number (≥ 1) of samples; x has shape {list(x.shape)}, "
                           f"y {list(y.shape)}.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidInput("x holds NaN or infinite values.")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise InvalidInput("y holds NaN or infinite values.")
    return x, y


def describe_dataset(source: Source) -> DatasetFacts:
    """Check a data set file and describe its arrays."""
    x, y = read_dataset(source)
    return DatasetFacts(len(x), list(x.shape), x.dtype.name, list(y.shape), y.dtype.name)


def score(outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Integer labels: accuracy of the arg-max and cross-entropy (outputs read as probabilities when each row
    is a distribution, else as logits); any other target of the outputs' shape: mean squared error as the loss."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if y.ndim == 1 and y.dtype.kind in "iu" and outputs.ndim == 2:
        if y.min() < 0 or y.max() >= outputs.shape[1]:
            raise ValueError(f"labels outside the {outputs.shape[1]} classes the model answers")
        is_distribution = in_unit_interval(outputs) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3)
        probabilities = outputs if is_distribution else softmax(outputs, axis=1)
        picked = np.clip(probabilities[np.arange(len(y)), y], PROBABILITY_FLOOR, 1.0)
        return {"server_accuracy": float((outputs.argmax(axis=1) == y).mean()),
                "server_loss": float(-np.log(picked).mean())}
    if outputs.shape != y.shape:
        raise ValueError(f"the model answers shape {list(outputs.shape)} for targets of shape {list(y.shape)}")
    return {"server_loss": float(((outputs - y) ** 2).mean())}
