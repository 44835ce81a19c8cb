"""The passes of one inference request and what DLR makes of their outputs (runs on a pool thread)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime

from fltraining.errors import InvalidInput
from fltraining.inference.graphs import BoundSession, check_weights
from fltraining.inference.statistics import interpret, softmax


@dataclass(frozen=True)
class Outcome:
    """What an inference answers: the prediction, its uncertainty, and (one pass only) the raw outputs."""

    inference: np.ndarray
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: np.ndarray | None = None


@dataclass(frozen=True)
class Moments:
    """SWAG's posterior per floating-point tensor: mean and standard deviation (var clipped at 0)."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]


def moments_of(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> Moments:
    """Mean = first moment, var = second − first², clipped at 0 (rounding can make it slightly negative)."""
    mean, std = {}, {}
    for name, first_moment in first.items():
        if first_moment.dtype.kind != "f":
            continue  # integer tensors (shapes, counters) are not sampled
        moment = np.asarray(first_moment, dtype=np.float64)
        variance = np.clip(np.asarray(second[name], dtype=np.float64) - moment**2, 0.0, None)
        mean[name] = np.array(first_moment)
        std[name] = np.sqrt(variance).astype(first_moment.dtype)
    return Moments(mean, std)


# Where onnxruntime's Dropout takes its randomness from when the graph sets no seed.
_SEEDS = np.random.default_rng()


def _run(bound: BoundSession, x: np.ndarray, options: onnxruntime.RunOptions,
         weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """One run; the graph's first output as float64."""
    feed = {bound.data_input.name: x, **(weights or {})}
    if bound.variant == "dropout":
        # onnxruntime seeds each run's Dropout generator with the previous run's seed + 1, and
        # consecutive seeds give nearly equal first draws: measured, the first unit of a one-row input
        # was kept in 400 of 400 runs. A fresh seed per run makes the runs' masks independent.
        onnxruntime.set_seed(int(_SEEDS.integers(2**31 - 1)))
    try:
        output = bound.session.run(None, feed, options)[0]
    except Exception as error:  # onnxruntime reports a bad input (or a stopped run) by its own exception types
        if options.terminate:
            raise
        raise InvalidInput(f"The model's graph cannot run on this model_input ({str(error).strip()[:300]}).") from None
    return np.asarray(output)


def run_stacked(bound: BoundSession, x: np.ndarray, passes: int, max_elements: int,
                options: onnxruntime.RunOptions) -> np.ndarray:
    """`passes` runs of the same input as one array (passes, batch, ...): stacked along the batch
    dimension into as few runs as `max_elements` allows when the graph's batch dimension is free."""
    if not bound.data_input.batch_is_free or x.ndim == 0:
        return np.stack([_run(bound, x, options) for _ in range(passes)])
    per_run = max(1, max_elements // max(1, x.size))
    parts: list[np.ndarray] = []
    done = 0
    while done < passes:
        count = min(per_run, passes - done)
        output = _run(bound, np.concatenate([x] * count), options)
        if output.ndim == 0 or output.shape[0] != count * x.shape[0]:  # the output is not per row: run singly
            parts.append(output[np.newaxis])
            parts.extend(_run(bound, x, options)[np.newaxis] for _ in range(passes - done - 1))
            break
        parts.append(output.reshape(count, x.shape[0], *output.shape[1:]))
        done += count
    return np.concatenate(parts)


def run_sampled(bound: BoundSession, x: np.ndarray, passes: int, current: Mapping[str, np.ndarray],
                moments: Moments, seed: int | None, options: onnxruntime.RunOptions) -> np.ndarray:
    """SWAG: each pass with its own independent weight sample from N(mean, diag(var)), reproducible by seed."""
    check_weights(bound.weight_names, {**current, **moments.mean})
    rng = np.random.default_rng(seed)
    outputs = []
    for _ in range(passes):
        sample = {name: np.asarray(value) for name, value in current.items() if name in bound.weight_names}
        for name, mean in moments.mean.items():
            noise = rng.standard_normal(mean.shape).astype(mean.dtype, copy=False)
            sample[name] = mean + moments.std[name] * noise
        outputs.append(_run(bound, x, options, sample))
    return np.stack(outputs)


def run_members(members: Sequence[BoundSession], x: np.ndarray, options: onnxruntime.RunOptions) -> np.ndarray:
    """ENSEMBLE: one pass per member model."""
    outputs = [_run(member, x, options) for member in members]
    shapes = {output.shape for output in outputs}
    if len(shapes) > 1:
        raise InvalidInput(f"The ensemble's members answer in different shapes {sorted(shapes)}.")
    return np.stack(outputs)


def single(output: np.ndarray) -> Outcome:
    """NONE, as DLR: the arg-max class per row (for outputs with a class axis), no uncertainty; raw outputs added."""
    inference = output.argmax(axis=1) if output.ndim >= 2 else output
    return Outcome(inference=inference, outputs=output)


def summarise(outputs: np.ndarray, use_softmax: bool) -> Outcome:
    """N passes (passes, batch, ...): their mean and DLR's statistics (softmax per pass first, if asked)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if use_softmax and outputs.ndim >= 3:  # a class axis exists (DLR's dim=1 of each pass's output)
        outputs = softmax(outputs, axis=2)
    return Outcome(inference=outputs.mean(axis=0), uncertainty=interpret(outputs))
