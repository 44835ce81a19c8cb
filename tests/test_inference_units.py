"""The pieces of inference on their own: DLR's statistics by hand, the pool's limits, passes, sampling."""

import asyncio
import math
import threading

import numpy as np
import onnxruntime
import pytest

from fltraining.errors import ServiceUnavailable
from fltraining.inference.evaluation import score
from fltraining.inference.graphs import build_session
from fltraining.inference.pool import InferencePool, SessionCache
from fltraining.inference.runner import moments_of, run_sampled, run_stacked, summarise
from fltraining.inference.statistics import interpret, softmax
from fltraining.weights import load_tensors
from tests.onnx_graphs import graph

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent


def test_statistics_match_hand_computed_values() -> None:
    """Two passes over one row: [0.5, 0.5] and [1, 0]."""
    outputs = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])
    found = interpret(outputs)
    np.testing.assert_allclose(found["variance"], [[0.125, 0.125]])  # unbiased, as torch's var
    np.testing.assert_allclose(found["std"], [[math.sqrt(0.125)] * 2])
    predictive = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of the mean [0.75, 0.25]
    expected = (math.log(2) + 0.0) / 2  # mean of H([.5, .5]) = ln 2 and H([1, 0]) = 0 (0·log 0 counts as 0)
    np.testing.assert_allclose(found["predictive_entropy"], [predictive])
    np.testing.assert_allclose(found["expected_entropy"], [expected])
    np.testing.assert_allclose(found["mutual_info"], [predictive - expected])


def test_outputs_outside_the_unit_interval_get_variance_and_std_only() -> None:
    found = interpret(np.array([[[2.0, -1.0]], [[4.0, -1.0]]]))
    assert set(found) == {"variance", "std"}
    np.testing.assert_allclose(found["variance"], [[2.0, 0.0]])


def test_one_pass_has_no_spread_to_report() -> None:
    assert interpret(np.array([[[0.2, 0.8]]])) == {}


def test_softmax_turns_each_row_into_probabilities() -> None:
    np.testing.assert_allclose(softmax(np.array([[0.0, math.log(3.0)]]), axis=1), [[0.25, 0.75]])
    outcome = summarise(np.array([[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]]), use_softmax=True)
    np.testing.assert_allclose(outcome.inference, [[0.5, 0.5]])
    assert "mutual_info" in outcome.uncertainty


def test_mc_passes_stacked_into_one_run_equal_separate_runs_in_distribution() -> None:
    """Stacked passes are independent: rows of one run get different dropout masks."""
    weights = {"layer.weight": np.ones((3, 2), np.float32), "layer.bias": np.zeros(3, np.float32)}
    content = graph(weights, dropout=True)
    session = build_session(content, load_tensors(content), "dropout", 1)
    x = np.ones((1, 2), np.float32)
    outputs = run_stacked(session, x, 200, 1_000_000, onnxruntime.RunOptions())
    assert outputs.shape == (200, 1, 3)
    # Each input unit survives with p = 0.5 and is scaled by 2: every output is 0, 2 or 4 (dropped, one, both).
    assert set(np.unique(outputs)) <= {0.0, 2.0, 4.0} and len(np.unique(outputs[:, 0, 0])) == 3


@pytest.mark.parametrize("seed", [None, 5], ids=["unseeded", "seeded dropout node"])
def test_passes_fall_back_to_single_runs_when_the_batch_dimension_is_fixed(seed: int | None) -> None:
    """Separate runs draw fresh masks, also where the graph's Dropout node carries a seed."""
    weights = {"layer.weight": np.ones((3, 2), np.float32), "layer.bias": np.zeros(3, np.float32)}
    content = graph(weights, dropout=True, batch=1, dropout_seed=seed)
    session = build_session(content, load_tensors(content), "dropout", 1)
    outputs = run_stacked(session, np.ones((1, 2), np.float32), 40, 1_000_000, onnxruntime.RunOptions())
    assert outputs.shape == (40, 1, 3)
    assert len(np.unique(outputs[:, 0, 0])) == 3  # 0, 2 and 4: masks differ between runs


def test_swag_samples_are_independent_per_pass_and_follow_the_seed() -> None:
    content = graph()
    session = build_session(content, None, "weights_as_inputs", 1)
    current = load_tensors(content)
    first = {name: np.zeros_like(value) for name, value in current.items()}
    second = {name: np.ones_like(value) for name, value in current.items()}  # var = 1 - 0² = 1
    moments = moments_of(first, second)
    x = np.ones((1, 2), np.float32)
    one = run_sampled(session, x, 50, current, moments, 3, onnxruntime.RunOptions())
    assert len({tuple(row) for row in one[:, 0, :]}) == 50
    np.testing.assert_array_equal(one, run_sampled(session, x, 50, current, moments, 3, onnxruntime.RunOptions()))
    # x·w + b with w, b ~ N(0, 1) per entry: each output ~ N(0, 3).
    assert 1.5 < one.var() < 4.5


def test_negative_variance_from_rounding_is_clipped_to_zero() -> None:
    moments = moments_of({"w": np.array([1.0], np.float32)}, {"w": np.array([0.9999999], np.float32)})
    assert moments.std["w"][0] == 0.0


async def test_a_saturated_pool_answers_503_with_retry_after_at_once() -> None:
    pool = InferencePool(threads=1, queue=0, timeout=30)
    release = threading.Event()
    started = threading.Event()

    def hold(_: onnxruntime.RunOptions) -> str:
        started.set()
        release.wait(10)
        return "done"

    first = asyncio.create_task(pool.run(hold))
    await asyncio.to_thread(started.wait, 10)
    with pytest.raises(ServiceUnavailable) as refused:
        await pool.run(lambda _: "never")
    assert refused.value.retry_after >= 1
    release.set()
    assert await first == "done"
    assert await pool.run(lambda _: "again") == "again"  # room again once the first finished
    pool.close()


async def test_a_request_past_its_deadline_is_stopped_and_answered_503() -> None:
    pool = InferencePool(threads=1, queue=0, timeout=0.2)
    stopped = threading.Event()

    def until_stopped(options: onnxruntime.RunOptions) -> None:
        while not options.terminate:  # onnxruntime checks the same flag between kernels
            stopped.wait(0.01)
        stopped.set()

    with pytest.raises(ServiceUnavailable, match="longer than 0.2 s"):
        await pool.run(until_stopped)
    assert await asyncio.to_thread(stopped.wait, 10)
    async with asyncio.timeout(10):
        while pool.active:  # the stopped job's thread hands itself back to the loop
            await asyncio.sleep(0.01)
    assert await pool.run(lambda _: "free") == "free"
    pool.close()


def test_the_session_cache_keeps_the_most_recently_used() -> None:
    cache = SessionCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3


def test_scores_by_hand() -> None:
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    found = score(probabilities, np.array([0, 0, 0]))
    assert found["server_accuracy"] == pytest.approx(2 / 3)
    assert found["server_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(0.9)) / 3)
    logits = np.log(probabilities)  # not rows of probabilities: read as logits, softmax gives them back
    assert score(logits, np.array([0, 0, 0]))["server_loss"] == pytest.approx(found["server_loss"])
    assert score(np.array([[1.0], [3.0]]), np.array([[0.0], [1.0]])) == {"server_loss": pytest.approx(2.5)}
    with pytest.raises(ValueError, match="labels outside"):
        score(probabilities, np.array([0, 2, 0]))
