"""DLR's uncertainty statistics over the outputs of N passes (`fl_server_ai/uncertainty/base.py`)."""

import numpy as np

# torch.distributions.Categorical clamps log-probabilities at the dtype's lowest value: 0·log 0 counts as 0.
_LOWEST = np.finfo(np.float64).min


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Categorical entropy over the last axis; rows are normalised to sum to 1 first, as torch does."""
    totals = probabilities.sum(axis=-1, keepdims=True)
    normalised = np.divide(probabilities, totals, out=np.zeros_like(probabilities), where=totals > 0)
    with np.errstate(divide="ignore"):
        logs = np.maximum(np.log(normalised), _LOWEST)
    return -(normalised * logs).sum(axis=-1)


def in_unit_interval(outputs: np.ndarray) -> bool:
    """Whether every output lies in [0, 1] (DLR then reads them as class probabilities)."""
    return bool(np.all(outputs >= 0.0) and np.all(outputs <= 1.0))


def predictive_entropy(outputs: np.ndarray) -> np.ndarray:
    """Entropy of the mean prediction over the passes; `outputs` is (N, batch, classes)."""
    return _entropy(outputs.mean(axis=0))


def expected_entropy(outputs: np.ndarray) -> np.ndarray:
    """Mean over the passes of each pass's prediction entropy."""
    return _entropy(outputs).mean(axis=0)


def interpret(outputs: np.ndarray) -> dict[str, np.ndarray]:
    """DLR's `interpret`: variance and std over the passes (unbiased, as torch's `var`), and for outputs
    in [0, 1] predictive entropy, expected entropy and their difference, the mutual information."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape[0] < 2:  # one pass has no spread (torch would answer NaN, which JSON cannot carry)
        return {}
    variance = outputs.var(axis=0, ddof=1)
    statistics = {"variance": variance, "std": np.sqrt(variance)}
    if outputs.ndim >= 2 and in_unit_interval(outputs):
        predictive = predictive_entropy(outputs)
        expected = expected_entropy(outputs)
        statistics |= {
            "predictive_entropy": predictive, "expected_entropy": expected, "mutual_info": predictive - expected,
        }
    return statistics


def softmax(outputs: np.ndarray, axis: int) -> np.ndarray:
    """Probabilities over the class axis (DLR's `torch.softmax(output, dim=1)` on each pass)."""
    shifted = outputs - outputs.max(axis=axis, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=axis, keepdims=True)
