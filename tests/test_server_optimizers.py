"""Server optimizers (FedAdam, FedYogi, FedAdagrad) against the equations of Reddi et al. as Flower 1.42
writes them, step by step, and in trainings."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.options import OPTIMIZER_DEFAULTS, DifferentialPrivacy, ServerOptimizer
from fltraining.weights import optimizers
from fltraining.weights.dp import private_into, private_of_files
from fltraining.weights.formats import detect_format, load_tensors, write_tensors
from fltraining.weights.optimizers import OptimizerStep, moments_signature, optimizer_files, optimizer_into
from fltraining.weights.signature import signature_of
from tests.fl_clients import GLOBAL_TENSORS, SimulatedClient, wait_for_state
from tests.helpers import register
from tests.onnx_graphs import graph
from tests.test_rounds import events_of, run_training


def flower_step(name: str, t: int, delta: Any, m: Any, v: Any,
                hyper: tuple[float, float, float, float] | None = None) -> tuple[Any, Any, Any]:
    """One step of Flower's equations written out directly (float64): (the move, m, v) for the t-th combined
    update `delta` above the current model."""
    lr, beta1, beta2, tau = hyper or OPTIMIZER_DEFAULTS[name]
    m = beta1 * m + (1 - beta1) * delta
    if name == "adam":
        v = beta2 * v + (1 - beta2) * delta**2
        rate = lr * np.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
    elif name == "yogi":
        v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        rate = lr
    else:
        v = v + delta**2
        rate = lr
    return rate * m / (np.sqrt(v) + tau), m, v


def reference(current: np.ndarray, combined: list[np.ndarray], name: str) -> np.ndarray:
    """The optimizer's steps from `current`, one per combined update, Flower's way."""
    m = v = np.zeros_like(current)
    for t, target in enumerate(combined, start=1):
        move, m, v = flower_step(name, t, target - current, m, v)
        current = current + move
    return current


def steady_path(name: str, delta: float, steps: int) -> float:
    """Where the optimizer takes a model starting at 0 when every combined update is `delta` above it."""
    value = m = v = 0.0
    for t in range(1, steps + 1):
        move, m, v = flower_step(name, t, delta, m, v)
        value += move
    return float(value)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_steps_follow_the_equations_over_several_rounds(name: str) -> None:
    rng = np.random.default_rng(11)
    start = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.float32(0.5).reshape(())}
    combined = [{key: value + rng.normal(size=value.shape).astype(np.float32) for key, value in start.items()}
                for _ in range(4)]
    signature = signature_of(start)
    lr, beta1, beta2, tau = OPTIMIZER_DEFAULTS[name]
    current, m, v = start, None, None
    for t, target in enumerate(combined, start=1):
        out = {key: np.empty_like(value) for key, value in start.items()}
        out_m = {key: np.empty(value.shape, np.float64) for key, value in start.items()}
        out_v = {key: np.empty(value.shape, np.float64) for key, value in start.items()}
        optimizer_into(current, target, m, v, signature, OptimizerStep(name, lr, beta1, beta2, tau, t), out, out_m, out_v)
        current, m, v = out, out_m, out_v
    for key, first in start.items():
        expected = reference(first.astype(np.float64), [c[key].astype(np.float64) for c in combined], name)
        np.testing.assert_allclose(current[key], expected.astype(np.float32), rtol=2e-6, atol=1e-7)


MIXED = {"scalar": ((), "float32"), "half": ((5,), "float16"), "matrix": ((2, 3), "float64"), "count": ((4,), "int64")}


def stored(value: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 result as the global model stores it: floats cast, integers rounded half to even."""
    return np.rint(value).astype(dtype) if np.dtype(dtype).kind == "i" else value.astype(dtype)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_steps_over_mixed_tensors_equal_the_equations(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["adam", "yogi", "adagrad"]))
    lr = data.draw(st.floats(1e-3, 1.0))
    beta1, beta2 = data.draw(st.floats(0.0, 0.99)), data.draw(st.floats(0.0, 0.999))
    tau = data.draw(st.floats(1e-9, 0.1))
    rounds = data.draw(st.integers(1, 4))
    block = data.draw(st.sampled_from([optimizers.MEAN_BLOCK, 2]))  # 2: several blocks per tensor

    def tensors() -> dict[str, np.ndarray]:
        numbers = st.floats(-100, 100, allow_nan=False, width=16)
        return {key: stored(np.array(data.draw(st.lists(numbers, min_size=int(np.prod(shape)),
                                                          max_size=int(np.prod(shape)))), np.float64).reshape(shape),
                            dtype)
                for key, (shape, dtype) in MIXED.items()}

    start = tensors()
    signature = signature_of(start)
    current, m, v = start, None, None
    expected = {key: (value.astype(np.float64), np.zeros(value.shape), np.zeros(value.shape))
                for key, value in start.items()}
    optimizers.MEAN_BLOCK, saved = block, optimizers.MEAN_BLOCK
    try:
        for t in range(1, rounds + 1):
            combined = tensors()
            out = {key: np.empty_like(value) for key, value in start.items()}
            out_m, out_v = ({key: np.empty(value.shape, np.float64) for key, value in start.items()} for _ in "mv")
            optimizer_into(current, combined, m, v, signature, OptimizerStep(name, lr, beta1, beta2, tau, t), out,
                           out_m, out_v)
            current, m, v = out, out_m, out_v
            for key, (shape, dtype) in MIXED.items():
                # Flower's equations, the model stored in its dtype between rounds.
                weights, first, second = expected[key]
                move, first, second = flower_step(name, t, combined[key].astype(np.float64) - weights, first, second,
                                                  (lr, beta1, beta2, tau))
                weights = stored(weights + move, dtype).astype(np.float64)
                expected[key] = (weights, first, second)
                assert current[key].dtype == np.dtype(dtype) and current[key].shape == shape
                np.testing.assert_allclose(m[key], first, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(v[key], second, rtol=1e-9, atol=1e-12)
                if np.dtype(dtype).kind == "i":  # a float64 rounding may land a half on the other side
                    assert np.abs(current[key].astype(np.int64) - weights.astype(np.int64)).max() <= 1
                    expected[key] = (current[key].astype(np.float64), first, second)
                else:
                    np.testing.assert_allclose(current[key].astype(np.float64), weights,
                                               rtol=1e-3 if dtype == "float16" else 1e-6, atol=1e-6)
                    expected[key] = (current[key].astype(np.float64), first, second)
    finally:
        optimizers.MEAN_BLOCK = saved


def test_files_carry_the_state_from_step_to_step(tmp_path: Path) -> None:
    start = {"w": np.linspace(-1, 1, 70_001).astype(np.float32)}  # more than one block
    combined = [{"w": start["w"] + np.float32(step)} for step in (1, 2, 3)]
    signature = signature_of(start)
    write_tensors(tmp_path / "g0", start)
    m = v = None
    for t, target in enumerate(combined, start=1):
        write_tensors(tmp_path / f"c{t}", target)
        optimizer_files(tmp_path / f"g{t - 1}", tmp_path / f"c{t}", m, v, signature, "safetensors",
                        OptimizerStep("adam", *OPTIMIZER_DEFAULTS["adam"], t), tmp_path / f"g{t}", tmp_path / f"m{t}",
                        tmp_path / f"v{t}")
        m, v = tmp_path / f"m{t}", tmp_path / f"v{t}"
        assert signature_of(load_tensors(m)) == moments_signature(signature)
    expected = reference(start["w"].astype(np.float64), [c["w"].astype(np.float64) for c in combined], "adam")
    np.testing.assert_allclose(load_tensors(tmp_path / "g3")["w"], expected.astype(np.float32), rtol=2e-6, atol=1e-6)


def test_options_take_flowers_defaults_and_refuse_bad_values() -> None:
    assert ServerOptimizer(name="yogi").resolved() == (0.01, 0.9, 0.99, 1e-3)
    assert ServerOptimizer(name="adam", lr=1.0).resolved() == (1.0, 0.9, 0.99, 1e-9)
    for bad in ({"name": "sgd"}, {"name": "adam", "beta1": 1.0}, {"name": "adam", "lr": 0}, {"name": "adam", "x": 1}):
        with pytest.raises(ValueError):
            ServerOptimizer.model_validate(bad)


async def test_fedadam_training_moves_the_model_as_the_equations_say(api: TestClient,
                                                                     clients: list[SimulatedClient]) -> None:
    actor = await register(api, actor=True)
    training_id = await run_training(api, actor, clients, target_num_updates=3,
                                     options={"server_optimizer": {"name": "adam"}, "skip_model_tests": True})
    final = await wait_for_state(api, actor, training_id, {"C", "E"})
    assert final["state"] == "C", final
    # Each round the clients send w + 1, w + 2, w + 3 (sample sizes 1, 2, 3): the mean is w + 14/6, so the
    # combined update is always 14/6 above the current model.
    model = await clients[0].download(final["model"])
    for name, tensor in model.items():
        np.testing.assert_allclose(tensor, np.full(GLOBAL_TENSORS[name].shape, steady_path("adam", 14 / 6, 3)),
                                   rtol=1e-5)
    aggregated: list[dict[str, Any]] = [e for e in await events_of(api, actor, training_id) if e["type"] == "aggregated"]
    assert [(e["data"]["optimizer"], e["data"]["optimizer_step"]) for e in aggregated] == [("adam", t) for t in (1, 2, 3)]


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "torch", "onnx"])
def test_optimizer_and_privacy_over_files_keep_the_models_format(tmp_path: Path, fmt: str) -> None:
    """Both write the new global model in the global model's format (ONNX: into its graph), with the values
    the in-memory computation gives."""
    rng = np.random.default_rng(3)
    start = {"layer.weight": rng.normal(size=(3, 2)).astype(np.float32), "layer.bias": np.zeros(3, np.float32)}
    updates = [{name: value + rng.normal(size=value.shape).astype(np.float32) for name, value in start.items()}
               for _ in range(3)]
    current = tmp_path / "global"
    if fmt == "onnx":
        current.write_bytes(graph(start))
    else:
        write_tensors(current, start, fmt)  # type: ignore[arg-type]
    paths = []
    for index, update in enumerate(updates):
        paths.append(tmp_path / f"u{index}")
        write_tensors(paths[-1], update)  # updates come in any format; safetensors here
    signature = signature_of(start)
    template = current if fmt == "onnx" else None
    step = OptimizerStep("yogi", *OPTIMIZER_DEFAULTS["yogi"], 1)
    optimizer_files(current, paths[0], None, None, signature, fmt, step, tmp_path / "g1",  # type: ignore[arg-type]
                    tmp_path / "m1", tmp_path / "v1", template=template)
    privacy = DifferentialPrivacy(clip_norm=0.5, noise_multiplier=0.0)
    private_of_files(current, paths, signature, fmt, tmp_path / "p1", privacy, None,  # type: ignore[arg-type]
                     np.random.default_rng(0), template=template)
    direct, private = ({name: np.empty_like(value) for name, value in start.items()} for _ in "gp")
    moments = [{name: np.empty(value.shape) for name, value in start.items()} for _ in "mv"]
    optimizer_into(start, updates[0], None, None, signature, step, direct, *moments)
    private_into(start, updates, signature, private, privacy, None, np.random.default_rng(0))
    for path, expected in ((tmp_path / "g1", direct), (tmp_path / "p1", private)):
        assert detect_format(path.read_bytes()) == fmt
        written = load_tensors(path)
        for name in start:
            np.testing.assert_array_equal(written[name], expected[name])
