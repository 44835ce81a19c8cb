"""Central differential privacy: clipping, the combination, the noise, and ε as dp-accounting gives it."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from fltraining.options import DifferentialPrivacy, KrumRule, MedianRule
from fltraining.privacy import epsilon
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
