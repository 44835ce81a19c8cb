"""The robust rules and server optimizers against Flower 1.42 on the same inputs (part of make bench-aggregation).

Seven updates of a small model (a 64 × 32 and a 32-element float32 tensor and a float32 scalar), sample
sizes 1 … 7, one of them a scaled sign-flipped outlier. Ours: the engine's functions over safetensors files
(`rule_of_files`, then `optimizer_files` for three rounds); Flower: `aggregate_median`,
`aggregate_trimmed_avg`, `aggregate_krum`, and the `FedAdam` / `FedYogi` / `FedAdagrad` strategies' own
`aggregate_fit` over three rounds. Before each of Flower's steps its strategy is given our current model and
our m and v (as float32), so every round compares one step from the same state: over several rounds the two
would drift apart by the float32 rounding of earlier rounds, which Adam and Adagrad amplify wherever the
combined update barely moves a coordinate (m / √v divides two tiny numbers). "Equal" means every value within
16 float32 units in the last place of the largest magnitude in play for its tensor (the inputs' for a rule;
the model's and the learning rate's for an optimizer): Flower computes in float32, we in float64.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fltraining.options import (
    OPTIMIZER_DEFAULTS,
    KrumRule,
    MedianRule,
    MultiKrumRule,
    TrimmedMeanRule,
)
from fltraining.weights.aggregate import mean_of_files
from fltraining.weights.formats import load_tensors, write_tensors
from fltraining.weights.optimizers import OptimizerStep, optimizer_files
from fltraining.weights.robust import rule_of_files
from fltraining.weights.signature import signature_of

NAMES = ("kernel", "bias", "scale")
ULPS = 16 * 2.0**-23
ROUNDS = 3


def updates(seed: int, base: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Seven updates around `base`; the last one a scaled, sign-flipped outlier."""
    rng = np.random.default_rng(seed)
    made = [[(layer + rng.normal(0, 0.05, layer.shape)).astype(np.float32) for layer in base] for _ in range(6)]
    made.append([(-10 * layer).astype(np.float32) for layer in made[0]])
    return made


def start_model(seed: int) -> list[np.ndarray]:
    """The global model both sides start from."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=32).astype(np.float32),
            np.asarray(rng.normal(), dtype=np.float32)]


def to_file(directory: Path, name: str, arrays: list[np.ndarray]) -> Path:
    """Arrays as a safetensors file, named as our engine names tensors."""
    path = directory / name
    write_tensors(path, dict(zip(NAMES, arrays, strict=True)))
    return path


def from_file(path: Path) -> list[np.ndarray]:
    """A file's tensors in order."""
    tensors = load_tensors(path)
    return [np.array(tensors[name]) for name in NAMES]


def difference(ours: list[np.ndarray], theirs: list[np.ndarray], scales: list[float]) -> tuple[float, bool]:
    """The largest absolute difference, and whether every value is within float32 rounding of its tensor's scale."""
    worst, equal = 0.0, True
    for a, b, scale in zip(ours, theirs, scales, strict=True):
        gap = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        worst = max(worst, float(gap.max(initial=0.0)))
        equal &= bool(np.all(gap <= ULPS * scale))
    return worst, equal


def magnitudes(*models: list[np.ndarray]) -> list[float]:
    """Per tensor, the largest magnitude any of the models holds."""
    return [max(float(np.max(np.abs(model[index]))) for model in models) for index in range(len(NAMES))]


def rules(directory: Path) -> list[tuple[str, float, bool]]:
    """Each robust rule, ours over files against Flower's function over arrays."""
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    given = updates(1, start_model(0))
    sizes = list(range(1, len(given) + 1))
    paths = [to_file(directory, f"u{index}", arrays) for index, arrays in enumerate(given)]
    signature = signature_of(dict(zip(NAMES, given[0], strict=True)))
    results = list(zip(given, sizes, strict=True))
    cases: list[tuple[str, object, Callable[[], list[np.ndarray]]]] = [
        ("median", MedianRule(rule="median"), lambda: aggregate_median(results)),
        ("trimmed_mean β = 0.2", TrimmedMeanRule(rule="trimmed_mean", trim_fraction=0.2),
         lambda: aggregate_trimmed_avg(results, 0.2)),
        ("krum f = 1", KrumRule(rule="krum", byzantine=1), lambda: aggregate_krum(results, 1, 0)),
        ("multi_krum f = 1, m = 3", MultiKrumRule(rule="multi_krum", byzantine=1, select=3),
         lambda: aggregate_krum(results, 1, 3)),
    ]
    rows = []
    for label, rule, flower in cases:
        out = directory / f"rule-{label.split()[0]}"
        rule_of_files(paths, sizes, signature, "safetensors", out, rule)  # type: ignore[arg-type]
        rows.append((label, *difference(from_file(out), flower(), magnitudes(*given))))
    return rows


def optimizers(directory: Path) -> list[tuple[str, float, bool]]:
    """Each server optimizer over three rounds of FedAvg-combined updates: ours against Flower's strategy."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAdagrad, FedAdam, FedYogi

    strategies = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}
    rows = []
    for name, strategy_class in strategies.items():
        start = start_model(2)
        strategy = strategy_class(initial_parameters=ndarrays_to_parameters(start))
        lr, beta1, beta2, tau = OPTIMIZER_DEFAULTS[name]
        current = to_file(directory, f"{name}-g0", start)
        signature = signature_of(dict(zip(NAMES, start, strict=True)))
        m = v = None
        worst, equal = 0.0, True
        for round_ in range(1, ROUNDS + 1):
            model = from_file(current)
            given = updates(10 + round_, model)[:6]  # honest updates around the current model
            sizes = list(range(1, len(given) + 1))
            # Flower's step starts from our state (see the module's text).
            strategy.current_weights = model
            strategy.m_t = None if m is None else [layer.astype(np.float32) for layer in from_file(m)]
            strategy.v_t = None if v is None else [layer.astype(np.float32) for layer in from_file(v)]
            fit = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), size, {}))
                   for arrays, size in zip(given, sizes, strict=True)]
            parameters, _ = strategy.aggregate_fit(round_, fit, [])  # type: ignore[arg-type]
            paths = [to_file(directory, f"{name}-r{round_}-u{index}", arrays) for index, arrays in enumerate(given)]
            combined = directory / f"{name}-r{round_}-mean"
            mean_of_files(paths, sizes, signature, "safetensors", combined)
            step = OptimizerStep(name, lr, beta1, beta2, tau, round_)
            new, new_m, new_v = (directory / f"{name}-{kind}{round_}" for kind in ("g", "m", "v"))
            optimizer_files(current, combined, m, v, signature, "safetensors", step, new, new_m, new_v)
            scales = [max(scale, lr) for scale in magnitudes(model, from_file(new))]
            gap, same = difference(from_file(new), parameters_to_ndarrays(parameters), scales)
            worst, equal = max(worst, gap), equal and same
            current, m, v = new, new_m, new_v
        rows.append((f"Fed{name.capitalize()} (defaults), {ROUNDS} rounds, step by step", worst, equal))
    return rows


def equality_table() -> str:
    """The table of rules and optimizers: largest difference from Flower and whether it is float32 rounding."""
    with tempfile.TemporaryDirectory(prefix="fltraining-flower-equality-") as name:
        directory = Path(name)
        rows = rules(directory) + optimizers(directory)
    lines = ["| rule or optimizer | largest |ours − Flower| | equal to Flower 1.42 within float32 rounding |",
             "|---|---:|---|"]
    lines += [f"| {label} | {worst:.3g} | {'yes' if equal else 'NO'} |" for label, worst, equal in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(equality_table())
