"""Robust aggregation rules against a direct NumPy computation over the stacked updates."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.options import KrumRule, MedianRule, MultiKrumRule, TrimmedMeanRule
from fltraining.weights import robust
from fltraining.weights.aggregate import _to_dtype, weighted_mean_into
from fltraining.weights.formats import load_tensors, write_tensors
from fltraining.weights.robust import coordinatewise_into, krum_into, krum_scores, rule_of_files
from fltraining.weights.signature import signature_of

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

SHAPES = {"scalar": (), "vector": (7,), "matrix": (3, 5)}


def updates_of(values: np.ndarray, dtype: str = "float32") -> list[dict[str, np.ndarray]]:
    """n updates cut from rows of `values` (n × 1 + 7 + 15) into a 0-d, a 1-d and a 2-d tensor."""
    updates = []
    for row in values:
        update, offset = {}, 0
        for name, shape in SHAPES.items():
            size = int(np.prod(shape, dtype=np.int64))
            update[name] = row[offset : offset + size].reshape(shape).astype(dtype)
            offset += size
        updates.append(update)
    return updates


def stacked(updates: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    """One tensor of every update, stacked along a new first axis, in float64."""
    return np.stack([update[name].astype(np.float64) for update in updates])


def empty_like(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Result arrays of an update's shapes and dtypes."""
    return {name: np.empty_like(value) for name, value in update.items()}


FLOATS = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def values(n: int) -> st.SearchStrategy[np.ndarray]:
    """n rows of 23 float32-representable numbers."""
    return st.lists(FLOATS, min_size=23 * n, max_size=23 * n).map(lambda flat: np.array(flat).reshape(n, 23))


@pytest.fixture(params=[robust.STACK_ELEMENTS, 6], ids=["one-block", "many-blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run each rule with the real block size and with blocks of a coordinate or two (many per tensor)."""
    monkeypatch.setattr(robust, "STACK_ELEMENTS", request.param)
    return int(request.param)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_median_is_numpys_median(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 9))
    updates = updates_of(data.draw(values(n)))
    for length in (robust.STACK_ELEMENTS, 6):
        robust.STACK_ELEMENTS, saved = length, robust.STACK_ELEMENTS
        try:
            out = empty_like(updates[0])
            coordinatewise_into(updates, signature_of(updates[0]), out, "median")
        finally:
            robust.STACK_ELEMENTS = saved
        for name in SHAPES:
            expected = np.median(stacked(updates, name), axis=0).astype(np.float32)
            np.testing.assert_array_equal(out[name], expected)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_trimmed_mean_drops_the_extremes(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 9))
    beta = data.draw(st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.49]))
    updates = updates_of(data.draw(values(n)))
    out = empty_like(updates[0])
    coordinatewise_into(updates, signature_of(updates[0]), out, "trimmed_mean", beta)
    cut = int(beta * n)
    for name in SHAPES:
        ordered = np.sort(stacked(updates, name), axis=0)
        expected = ordered[cut : n - cut].mean(axis=0).astype(np.float32)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6)


def test_integer_and_bool_tensors_are_rounded_like_the_mean(blocks: int) -> None:
    rows = np.array([[1, 2, 3], [2, 4, 8], [10, 0, 1], [3, 3, 3]], dtype=np.int64)
    updates = [{"counts": row.astype(np.int32), "mask": (row % 2 == 0)} for row in rows]
    out = {"counts": np.empty(3, np.int32), "mask": np.empty(3, np.bool_)}
    coordinatewise_into(updates, signature_of(updates[0]), out, "median")
    median = np.median(rows.astype(np.float64), axis=0)
    np.testing.assert_array_equal(out["counts"], _to_dtype(median, np.dtype(np.int32)))
    np.testing.assert_array_equal(out["mask"], np.median((rows % 2 == 0).astype(float), axis=0) > 0.5)


def test_a_scaled_sign_flipped_update_moves_the_mean_but_not_the_median(blocks: int) -> None:
    honest = [{"w": np.full(50, 1.0 + i / 100, np.float32)} for i in range(4)]
    attacker = {"w": np.full(50, -10.0 * 1.02, np.float32)}
    updates = [*honest, attacker]
    out = empty_like(honest[0])
    weighted_mean_into(updates, [1] * 5, signature_of(attacker), out)
    assert np.allclose(out["w"], np.mean([1.0, 1.01, 1.02, 1.03, -10.2]))  # about -1.2: the mean is lost
    coordinatewise_into(updates, signature_of(attacker), out, "median")
    assert np.allclose(out["w"], 1.01)  # sorted: -10.2, 1.00, 1.01, 1.02, 1.03
    coordinatewise_into(updates, signature_of(attacker), out, "trimmed_mean", 0.2)
    assert np.allclose(out["w"], np.mean([1.0, 1.01, 1.02]))  # -10.2 and 1.03 dropped


def direct_krum_scores(updates: list[dict[str, np.ndarray]], byzantine: int) -> list[float]:
    """Krum's scores as Blanchard et al. define them, pair by pair on the flattened updates."""
    flat = [np.concatenate([value.astype(np.float64).reshape(-1) for value in update.values()]) for update in updates]
    n = len(flat)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: n - byzantine - 2]))
    return scores


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_krum_scores_and_selection(data: st.DataObject) -> None:
    byzantine = data.draw(st.integers(0, 2))
    n = data.draw(st.integers(2 * byzantine + 3, 2 * byzantine + 7))
    updates = updates_of(data.draw(values(n)) / 1000)
    signature = signature_of(updates[0])
    expected = direct_krum_scores(updates, byzantine)
    scores = krum_scores(updates, signature, byzantine)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-6)
    out = empty_like(updates[0])
    choice = krum_into(updates, [1] * n, signature, out, byzantine)
    best = min(range(n), key=lambda index: (scores[index], index))
    assert choice.selected == [best]
    for name in SHAPES:  # Krum's result is the selected update itself, bit for bit
        np.testing.assert_array_equal(out[name], updates[best][name])


def test_multi_krum_is_the_weighted_mean_of_the_best_scored(blocks: int) -> None:
    rng = np.random.default_rng(3)
    honest = [{"w": rng.normal(1.0, 0.01, 40).astype(np.float32)} for _ in range(6)]
    attackers = [{"w": np.full(40, -10.0, np.float32)}, {"w": np.full(40, 25.0, np.float32)}]
    updates = [*honest, *attackers]
    weights = [1, 2, 3, 4, 5, 6, 100, 100]
    out = empty_like(honest[0])
    choice = krum_into(updates, weights, signature_of(honest[0]), out, byzantine=2, select=4)
    scores = direct_krum_scores(updates, 2)
    chosen = sorted(range(8), key=lambda index: (scores[index], index))[:4]
    assert choice.selected == chosen and not {6, 7} & set(chosen)
    expected = sum(weights[i] * updates[i]["w"].astype(np.float64) for i in chosen) / sum(weights[i] for i in chosen)
    np.testing.assert_allclose(out["w"], expected.astype(np.float32), rtol=1e-6)


def test_krum_refuses_too_few_updates() -> None:
    updates = [{"w": np.zeros(3, np.float32)} for _ in range(4)]
    with pytest.raises(ValueError, match="needs at least 5 updates"):
        krum_scores(updates, signature_of(updates[0]), byzantine=2)
    with pytest.raises(ValueError, match="selects 1"):
        krum_into(updates, [1] * 4, signature_of(updates[0]), empty_like(updates[0]), byzantine=0, select=5)


@pytest.mark.parametrize("rule", [MedianRule(rule="median"), TrimmedMeanRule(rule="trimmed_mean", trim_fraction=0.25),
                                  KrumRule(rule="krum", byzantine=1), MultiKrumRule(rule="multi_krum", byzantine=1,
                                                                                    select=2)])
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_rules_over_files_equal_the_rules_over_arrays(tmp_path: Path, rule: object, fmt: str) -> None:
    rng = np.random.default_rng(7)
    updates = [{"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=()).astype(np.float64),
                "c": rng.integers(0, 9, 5).astype(np.int64)} for _ in range(5)]
    paths = []
    for index, update in enumerate(updates):
        paths.append(tmp_path / f"u{index}.{fmt}")
        write_tensors(paths[-1], update, fmt)  # type: ignore[arg-type]
    signature = signature_of(updates[0])
    weights = [3, 1, 4, 1, 5]
    rule_of_files(paths, weights, signature, fmt, tmp_path / "out", rule)  # type: ignore[arg-type]
    from_files = load_tensors(tmp_path / "out")
    direct = empty_like(updates[0])
    if isinstance(rule, KrumRule):
        krum_into(updates, weights, signature, direct, rule.byzantine,
                  rule.select if isinstance(rule, MultiKrumRule) else None)
    else:
        kind = "median" if isinstance(rule, MedianRule) else "trimmed_mean"
        coordinatewise_into(updates, signature, direct, kind, getattr(rule, "trim_fraction", 0.0))
    for name in updates[0]:
        np.testing.assert_array_equal(from_files[name], direct[name])
