"""Central differential privacy, server-side fixed clipping (DP-FedAvg, McMahan et al., 2018).

Each update's difference from the current global model is scaled to L2 norm at most C (over all float
tensors together); the clipped differences are combined unweighted — the mean, or the training's rule —
and added to the global model, and every float coordinate gets independent Gaussian noise of standard
deviation z·C/n (n: the updates averaged). Integer tensors keep the global model's values. Two block-major
passes over the mapped files (norms, then the combination), memory independent of n.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltraining.options import (
    AggregationRule,
    DifferentialPrivacy,
    KrumRule,
    MedianRule,
    MultiKrumRule,
    TrimmedMeanRule,
)
from fltraining.weights.aggregate import Target, into_file
from fltraining.weights.codecs import Format
from fltraining.weights.formats import load_tensors
from fltraining.weights.robust import (
    Coordinatewise,
    coordinatewise_into,
    krum_scores,
    krum_select,
    stacked_blocks,
)
from fltraining.weights.signature import TensorSpec, check_matches, signature_of


@dataclass(frozen=True)
class PrivateRound:
    """What a private aggregation did: how many updates it clipped, how many it averaged, Krum's choice."""

    clipped: int
    averaged: int
    selected: list[int] | None = None
    scores: list[float] | None = None


def is_float(spec: TensorSpec) -> bool:
    """Whether a tensor takes clipping and noise (floats, bfloat16 included); integers and bools do not."""
    dtype = np.dtype(spec.dtype) if spec.dtype != "bfloat16" else None
    return dtype is None or dtype.kind == "f"


def difference_norms(
    current: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]], signature: Mapping[str, TensorSpec],
) -> np.ndarray:
    """Each update's L2 distance from the current model over all float tensors, block-major."""
    sums = np.zeros(len(updates), dtype=np.float64)
    floats = {name: spec for name, spec in signature.items() if is_float(spec)}
    for name, start, stack in stacked_blocks(updates, floats):
        stack -= np.asarray(current[name]).reshape(-1)[start : start + stack.shape[1]].astype(np.float64)
        sums += np.einsum("ij,ij->i", stack, stack)
    return np.sqrt(sums)


def private_into(
    current: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
    signature: Mapping[str, TensorSpec], out: Target, privacy: DifferentialPrivacy, rule: AggregationRule | None,
    rng: np.random.Generator, progress: Callable[[], None] = lambda: None, field: str = "model_file",
) -> PrivateRound:
    """Clip, combine, add noise: write the new global model into `out`."""
    check_matches(signature, signature_of(current), "global model")
    for update in updates:
        check_matches(signature, signature_of(update), field)
    norms = difference_norms(current, updates, signature)
    bound = privacy.clip_norm
    scales = bound / np.maximum(norms, bound)  # 1 within the bound; never a division by (near) zero
    clipped = int(np.count_nonzero(norms > bound))
    chosen = list(range(len(updates)))
    scores: list[float] | None = None

    def clip(name: str, start: int, stack: np.ndarray, row_scales: np.ndarray) -> None:
        # Rows become the clipped differences from the global model (float tensors only).
        if is_float(signature[name]):
            base = np.asarray(current[name]).reshape(-1)[start : start + stack.shape[1]].astype(np.float64)
            stack -= base
            stack *= row_scales[:, None]

    if isinstance(rule, KrumRule):
        def clip_all(name: str, start: int, stack: np.ndarray) -> None:
            clip(name, start, stack, scales)

        scores = krum_scores(updates, signature, rule.byzantine, progress, field,
                             transform=clip_all)  # distances between the clipped updates
        chosen = krum_select(scores, rule.select if isinstance(rule, MultiKrumRule) else 1)
    picked = [updates[index] for index in chosen]
    picked_scales = scales[chosen]
    sigma = privacy.noise_multiplier * bound / len(picked)

    def clip_picked(name: str, start: int, stack: np.ndarray) -> None:
        clip(name, start, stack, picked_scales)

    def finish(name: str, start: int, block: np.ndarray) -> np.ndarray:
        base = np.asarray(current[name]).reshape(-1)[start : start + block.size].astype(np.float64)
        if not is_float(signature[name]):
            return base  # integer tensors keep the global model's values
        return base + block + rng.standard_normal(block.size) * sigma

    kind: Coordinatewise = "median" if isinstance(rule, MedianRule) else (
        "trimmed_mean" if isinstance(rule, TrimmedMeanRule) else "mean")
    beta = rule.trim_fraction if isinstance(rule, TrimmedMeanRule) else 0.0
    coordinatewise_into(picked, signature, out, kind, beta, progress, field, transform=clip_picked, finish=finish)
    return PrivateRound(clipped, len(picked), chosen if scores is not None else None, scores)


def private_of_files(
    current: Path, paths: Sequence[Path], signature: Mapping[str, TensorSpec], fmt: Format, out: Path,
    privacy: DifferentialPrivacy, rule: AggregationRule | None, rng: np.random.Generator,
    progress: Callable[[], None] = lambda: None, field: str = "model_file", template: Path | None = None,
) -> PrivateRound:
    """`private_into` over mapped model files, the result written as a model file."""
    base = load_tensors(current)
    return into_file(list(paths), signature, fmt, out, lambda updates, target: private_into(
        base, updates, signature, target, privacy, rule, rng, progress, field), template)
