"""Adaptive server optimizers (Reddi et al., 2021) with Flower 1.42's equations: FedAdam, FedYogi, FedAdagrad.

With Δ = combined − current: m ← β₁m + (1 − β₁)Δ; v ← β₂v + (1 − β₂)Δ² (adam), v ← v − (1 − β₂)Δ²·sign(v − Δ²)
(yogi), v ← v + Δ² (adagrad); new = current + η′·m / (√v + τ), where η′ = η·√(1 − β₂^(t+1)) / (1 − β₁^(t+1))
for adam (Flower's bias correction, t the optimizer's step counted from 1) and η otherwise. Every value is
computed in float64, block by block; m and v are kept in float64 files beside the global model.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltraining.weights.aggregate import MEAN_BLOCK, FileTarget, Target, emit_block, into_file
from fltraining.weights.codecs import Format
from fltraining.weights.formats import load_tensors
from fltraining.weights.safetensors_files import create_safetensors
from fltraining.weights.signature import TensorSpec, check_matches, signature_of


@dataclass(frozen=True)
class OptimizerStep:
    """One step of a server optimizer: which one, its hyperparameters and its step number t (from 1)."""

    name: str
    lr: float
    beta1: float
    beta2: float
    tau: float
    step: int

    @property
    def rate(self) -> float:
        """η′: Adam's bias-corrected rate for this step (as Flower computes it), the plain η otherwise."""
        if self.name != "adam":
            return self.lr
        return self.lr * float(np.sqrt(1 - self.beta2 ** (self.step + 1.0))) / (1 - self.beta1 ** (self.step + 1.0))


def moments_signature(signature: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """m and v: one float64 tensor per tensor of the model."""
    return {name: TensorSpec(spec.shape, "float64") for name, spec in signature.items()}


def step_block(
    step: OptimizerStep, current: np.ndarray, combined: np.ndarray, m: np.ndarray, v: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(new weights, m, v) of one block, all float64."""
    delta = combined - current
    m = step.beta1 * m + (1 - step.beta1) * delta
    squared = delta * delta
    if step.name == "adam":
        v = step.beta2 * v + (1 - step.beta2) * squared
    elif step.name == "yogi":
        v = v - (1.0 - step.beta2) * squared * np.sign(v - squared)
    else:
        v = v + squared
    return current + step.rate * m / (np.sqrt(v) + step.tau), m, v


def optimizer_into(
    current: Mapping[str, np.ndarray], combined: Mapping[str, np.ndarray], m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None, signature: Mapping[str, TensorSpec], step: OptimizerStep,
    out: Target, out_m: Target, out_v: Target, progress: Callable[[], None] = lambda: None,
) -> None:
    """Write the new global model, m and v (zeros before the first step), a block at a time."""
    for tensors, field in ((current, "global model"), (combined, "combined update")):
        check_matches(signature, signature_of(tensors), field)
    narrow = np.empty(MEAN_BLOCK, dtype=np.float32)
    for name, spec in signature.items():
        size = int(np.prod(spec.shape, dtype=np.int64))
        flat = [np.asarray(tensors[name]).reshape(-1) for tensors in (current, combined)]
        moments = [None if state is None else np.asarray(state[name]).reshape(-1) for state in (m, v)]
        for start in range(0, size, MEAN_BLOCK):
            stop = min(start + MEAN_BLOCK, size)
            now, target = (values[start:stop].astype(np.float64) for values in flat)
            previous = [np.zeros(stop - start) if state is None else state[start:stop].astype(np.float64)
                        for state in moments]
            new, m_block, v_block = step_block(step, now, target, previous[0], previous[1])
            emit_block(out, name, start, new, narrow)
            emit_block(out_m, name, start, m_block, narrow)
            emit_block(out_v, name, start, v_block, narrow)
            progress()


def optimizer_files(
    current: Path, combined: Path, m: Path | None, v: Path | None, signature: Mapping[str, TensorSpec],
    fmt: Format, step: OptimizerStep, out: Path, out_m: Path, out_v: Path, progress: Callable[[], None] = lambda: None,
    template: Path | None = None,
) -> None:
    """One optimizer step over mapped files: the new global model (in its format) and m and v (safetensors)."""
    state = moments_signature(signature)
    sources = [load_tensors(path) for path in (current, combined)]
    previous = [None if path is None else load_tensors(path) for path in (m, v)]
    for found in previous:
        if found is not None:
            check_matches(state, signature_of(found), "optimizer state")
    offsets = [create_safetensors(path, state) for path in (out_m, out_v)]
    fds = [os.open(path, os.O_WRONLY) for path in (out_m, out_v)]
    try:
        m_target, v_target = (FileTarget(fd, where, state) for fd, where in zip(fds, offsets, strict=True))
        # The new global model in its own format (ONNX: into the template graph), m and v block by block.
        into_file([current], signature, fmt, out, lambda _, target: optimizer_into(
            sources[0], sources[1], previous[0], previous[1], signature, step, target, m_target, v_target,
            progress), template)
    finally:
        for fd in fds:
            os.close(fd)
