"""Central differential privacy: clipping, the combination, the noise, and ε as dp-accounting gives it."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.options import DifferentialPrivacy, KrumRule, MedianRule
from fltraining.privacy import epsilon
from fltraining.weights import robust
from fltraining.weights.dp import private_into
from fltraining.weights.signature import signature_of

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent


def accountant_epsilon(z: float, rounds: int, delta: float) -> float:
    """ε straight from dp-accounting's RDP accountant."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds))
    return float(accountant.get_epsilon(delta))


def test_without_noise_the_result_is_exactly_the_clipped_mean() -> None:
    current = {"w": np.zeros(4, np.float32), "steps": np.array([7], np.int64)}
    updates = [
        {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32), "steps": np.array([9], np.int64)},  # norm 5 → scaled to 1
        {"w": np.array([0.0, 0.0, 0.3, 0.4], np.float32), "steps": np.array([1], np.int64)},  # norm 0.5: kept
        {"w": np.array([0.0, 0.1, 0.0, 0.0], np.float32), "steps": np.array([2], np.int64)},  # norm 0.1: kept
    ]
    out = {name: np.empty_like(value) for name, value in current.items()}
    privacy = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=0.0)
    done = private_into(current, updates, signature_of(current), out, privacy, None, np.random.default_rng(0))
    differences = [update["w"].astype(np.float64) for update in updates]  # from the float32 values sent
    clipped = [d * min(1.0, 1.0 / float(np.linalg.norm(d))) for d in differences]
    np.testing.assert_array_equal(out["w"], (sum(clipped) / 3).astype(np.float32))
    assert out["steps"].tolist() == [7]  # integer tensors keep the global model's values
    assert (done.clipped, done.averaged) == (1, 3)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_updates_give_the_mean_of_their_clipped_differences(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 7))
    bound = data.draw(st.floats(0.01, 100.0))
    numbers = st.floats(-50, 50, allow_nan=False, width=32)
    shapes = {"scalar": ((), "float32"), "w": ((2, 3), "float32"), "h": ((4,), "float64"), "n": ((3,), "int32")}

    def tensors() -> dict[str, np.ndarray]:
        return {key: np.array(data.draw(st.lists(numbers, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                              np.float64).reshape(shape).astype(dtype)
                for key, (shape, dtype) in shapes.items()}

    current, updates = tensors(), [tensors() for _ in range(n)]
    floats = [key for key, (_, dtype) in shapes.items() if dtype != "int32"]
    expected = {key: np.zeros(shapes[key][0]) for key in floats}
    for update in updates:  # each difference's L2 norm over every float tensor together, scaled to at most C
        differences = {key: update[key].astype(np.float64) - current[key].astype(np.float64) for key in floats}
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in differences.values())))
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        for key in floats:
            expected[key] += differences[key] * scale / n
    block = data.draw(st.sampled_from([robust.STACK_ELEMENTS, 3]))  # 3: many blocks per tensor
    robust.STACK_ELEMENTS, saved = block, robust.STACK_ELEMENTS
    try:
        out = {key: np.empty_like(value) for key, value in current.items()}
        private_into(current, updates, signature_of(current), out,
                     DifferentialPrivacy(clip_norm=bound, noise_multiplier=0.0), None, np.random.default_rng(0))
    finally:
        robust.STACK_ELEMENTS = saved
    for key in floats:
        result = current[key].astype(np.float64) + expected[key]
        np.testing.assert_allclose(out[key].astype(np.float64), result.astype(shapes[key][1]), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["n"], current["n"])  # integer tensors keep the global model's values


def test_clipping_is_relative_to_the_current_model_and_goes_through_the_rule() -> None:
    current = {"w": np.full(3, 10.0, np.float32)}
    updates = [{"w": np.full(3, 10.0 + d, np.float32)} for d in (0.1, 0.2, 50.0)]  # the last is clipped
    out = {"w": np.empty(3, np.float32)}
    privacy = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=0.0)
    private_into(current, updates, signature_of(current), out, privacy, MedianRule(rule="median"),
                 np.random.default_rng(0))
    np.testing.assert_allclose(out["w"], 10.2, rtol=1e-6)  # median of 0.1, 0.2, 1/√3·(…): 0.2
    done = private_into(current, updates, signature_of(current), out, privacy, KrumRule(rule="krum", byzantine=0),
                        np.random.default_rng(0))
    # Clipped differences 0.1, 0.2 and 1/√3 per coordinate: the first two are each other's nearest (a tie,
    # to the first); unclipped, the outlier would be as far, and Krum would score it on its raw distance.
    assert done.selected == [0] and done.averaged == 1 and done.scores is not None
    np.testing.assert_allclose(done.scores[2], 3 * (1 / np.sqrt(3) - 0.2) ** 2, rtol=1e-5)


def test_noise_has_the_standard_deviation_z_c_over_n() -> None:
    size = 1_200_000
    current = {"w": np.zeros(size, np.float32)}
    updates = [{"w": np.zeros(size, np.float32)} for _ in range(4)]  # no signal: the result is the noise
    out = {"w": np.empty(size, np.float32)}
    privacy = DifferentialPrivacy(clip_norm=1.5, noise_multiplier=2.0)
    private_into(current, updates, signature_of(current), out, privacy, None, np.random.default_rng(5))
    expected = 2.0 * 1.5 / 4
    assert abs(float(np.std(out["w"], dtype=np.float64)) / expected - 1) < 0.02
    assert abs(float(np.mean(out["w"], dtype=np.float64))) < 0.01 * expected


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 10, 1e-5), (0.7, 3, 1e-6), (4.0, 100, 1e-5)])
def test_epsilon_is_dp_accountings(z: float, rounds: int, delta: float) -> None:
    assert epsilon(z, rounds, delta) == accountant_epsilon(z, rounds, delta)
    assert epsilon(z, 0, delta) == 0.0 and math.isinf(epsilon(0.0, rounds, delta))
