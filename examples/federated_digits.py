"""Federated learning demo: five clients learn to read handwritten digits without sharing them.

Starts fltraining on its embedded store (in a temporary directory), registers an actor and five
clients, each with its own notification server and a non-IID share of scikit-learn's bundled
digits data set (no download), and runs 10 rounds of a softmax-regression model through the
service's HTTP API: FedAvg, FedDC (daisy chaining, period 2) or SWAG. The model is an ONNX graph
(dropout on the pixels, then Gemm and Softmax) whose initializers the clients train in numpy.
After every aggregation it downloads the global model and prints its accuracy on held-out digits;
after the training it asks `POST /api/inference/` about every held-out digit, with MC dropout
(fedavg, feddc) or SWAG (swag), and prints how well the predictive entropy flags wrong answers.

    python examples/federated_digits.py [--method fedavg|feddc|swag|all] [--rounds 10]
"""

import argparse
import asyncio
import contextlib
import io
import json
import random
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import FormData, web
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from fltraining.settings import Settings
from fltraining.weights import dump_tensors, load_tensors
from routes.app import create_app

CLASSES = 10
FEATURES = 64
PASSWORD = "federated digits demo"
METHODS = ("fedavg", "feddc", "swag")
ATTACK_SCALE = 10.0
UNCERTAINTY = {"fedavg": "MC_DROPOUT", "feddc": "MC_DROPOUT", "swag": "SWAG"}
DROPOUT = 0.2  # share of pixels dropped, in the clients' training and in the graph's MC passes
PASSES = 20
Weights = dict[str, np.ndarray]


# -- data and model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Features (pixels scaled to [0, 1]) and labels."""

    x: np.ndarray
    y: np.ndarray


def load_splits(clients: int, seed: int, alpha: float = 0.5) -> tuple[list[Split], Split]:
    """Non-IID client shares (label proportions from a Dirichlet(α) per label: 0.5 is far from IID, 100 close
    to it) and a held-out test set."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test_size = len(y) // 4
    test = Split(x[order[:test_size]], y[order[:test_size]])
    train_idx = order[test_size:]
    shares: list[list[int]] = [[] for _ in range(clients)]
    for label in range(CLASSES):
        members = train_idx[y[train_idx] == label]
        proportions = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].extend(part.tolist())
    return [Split(x[np.array(share)], y[np.array(share)]) for share in shares], test


def initial_model() -> Weights:
    """All-zero softmax regression."""
    return {"softmax.weight": np.zeros((CLASSES, FEATURES), np.float32), "softmax.bias": np.zeros(CLASSES, np.float32)}


def model_graph(weights: Weights) -> bytes:
    """The model as ONNX: x [batch, 64] → Dropout → Gemm → Softmax, with `weights` as initializers."""
    initializers = [numpy_helper.from_array(np.asarray(value, np.float32), name)
                    for name, value in weights.items()]
    nodes = [
        # A Constant node, not an initializer: the ratio is no weight to train, aggregate or sample.
        helper.make_node("Constant", [], ["dropout.ratio"], value_float=DROPOUT),
        # No `seed` attribute: onnxruntime would then draw the same masks in every run, so MC passes the
        # service spreads over several runs (large inputs) would repeat each other.
        helper.make_node("Dropout", ["x", "dropout.ratio"], ["x.dropped"]),
        helper.make_node("Gemm", ["x.dropped", "softmax.weight", "softmax.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, CLASSES])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="federated_digits")
    model.ir_version = 8  # opset 17's IR version, which every onnxruntime reading opset 17 loads
    return model.SerializeToString()


def predict(weights: Weights, x: np.ndarray) -> np.ndarray:
    """Class probabilities with every pixel kept (the graph's Dropout in inference mode)."""
    logits = x @ weights["softmax.weight"].T + weights["softmax.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def accuracy(weights: Weights, data: Split) -> float:
    """Share of correctly classified samples."""
    return float((predict(weights, data.x).argmax(axis=1) == data.y).mean())


def sgd_steps(weights: Weights, data: Split, epochs: int, rng: np.random.Generator,
              anchor: Weights | None = None, mu: float = 0.0) -> Iterator[Weights]:
    """Mini-batch gradient descent on cross-entropy with the graph's pixel dropout (plus FedProx's
    proximal term); yields after every batch."""
    current = {name: value.astype(np.float32).copy() for name, value in weights.items()}
    for _ in range(epochs):
        order = rng.permutation(len(data.y))
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            # Inverted dropout, as ONNX Dropout in training mode: kept pixels scaled by 1 / (1 - ratio).
            kept = rng.random(data.x[batch].shape) >= DROPOUT
            x = data.x[batch] * (kept / (1.0 - DROPOUT)).astype(np.float32)
            probs = predict(current, x)
            probs[np.arange(len(batch)), data.y[batch]] -= 1.0
            grad_w = probs.T @ x / len(batch)
            grad_b = probs.mean(axis=0)
            if anchor is not None and mu:
                grad_w += mu * (current["softmax.weight"] - anchor["softmax.weight"])
                grad_b += mu * (current["softmax.bias"] - anchor["softmax.bias"])
            current["softmax.weight"] -= 0.5 * grad_w.astype(np.float32)
            current["softmax.bias"] -= 0.5 * grad_b.astype(np.float32)
            yield current


def train(weights: Weights, data: Split, rng: np.random.Generator, mu: float = 0.0) -> Weights:
    """Two local epochs from the given weights."""
    result = weights
    for result in sgd_steps(weights, data, 2, rng, anchor=weights, mu=mu):
        pass
    return {name: value.copy() for name, value in result.items()}


def swag_moments(weights: Weights, data: Split, rng: np.random.Generator) -> tuple[Weights, Weights]:
    """SWAG statistics: the mean and mean square of the weights along one epoch of SGD."""
    first = {name: np.zeros_like(value, np.float64) for name, value in weights.items()}
    second = {name: np.zeros_like(value, np.float64) for name, value in weights.items()}
    count = 0
    for snapshot in sgd_steps(weights, data, 1, rng):
        count += 1
        for name, value in snapshot.items():
            first[name] += value
            second[name] += np.square(value, dtype=np.float64)
    return ({name: (value / count).astype(np.float32) for name, value in first.items()},
            {name: (value / count).astype(np.float32) for name, value in second.items()})


# -- the simulated clients ------------------------------------------------------------------------

@dataclass
class DemoClient:
    """One participant: trains on its own digits when the service asks."""

    name: str
    data: Split
    session: aiohttp.ClientSession
    rng: np.random.Generator
    headers: dict[str, str] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    pace: float = 0.0  # seconds of pretend training before each upload, so a person can watch the rounds
    attacker: bool = False  # uploads its update sign-flipped and scaled ×10 (the attack demo)

    async def download(self, model_id: str) -> Weights:
        """The named model's weights."""
        async with self.session.get(f"/api/models/{model_id}/", headers=self.headers) as response:
            response.raise_for_status()
            return {name: np.array(value) for name, value in load_tensors(await response.read()).items()}

    async def on_notification(self, request: web.Request) -> web.Response:
        """Receive a notification; round work runs after answering (202), as DLR clients do."""
        message = await request.json()
        jobs = {"UPDATE_ROUND_START": self.update, "MODEL_TEST_ROUND": self.test, "SWAG_ROUND_START": self.swag}
        job = jobs.get(message["notification_type"])
        if job is None:
            return web.Response(status=200)
        task = asyncio.create_task(self._guarded(job(message["body"])))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return web.Response(status=202)

    async def _guarded(self, job: Any) -> None:
        try:
            await job
        except Exception as error:
            self.failures.append(repr(error))

    async def update(self, body: dict[str, Any]) -> None:
        """Train locally and upload the update."""
        weights = await self.download(body["global_model_uuid"])
        trained = await asyncio.to_thread(train, weights, self.data, self.rng, body.get("fedprox_mu", 0.0))
        if self.attacker:
            trained = {name: weights[name] - ATTACK_SCALE * (trained[name] - weights[name]) for name in trained}
        if self.pace:  # jittered, and never from `rng`, so the demo's training is the same with or without it
            await asyncio.sleep(self.pace * random.uniform(0.5, 1.5))
        form = FormData()
        form.add_field("round", str(body["round"]))
        form.add_field("sample_size", str(len(self.data.y)))
        form.add_field("model_file", dump_tensors(trained), filename="model_file")
        async with self.session.post(f"/api/models/{body['global_model_uuid']}/", data=form,
                                     headers=self.headers) as response:
            response.raise_for_status()

    async def test(self, body: dict[str, Any]) -> None:
        """Report the global model's accuracy on the local data."""
        weights = await self.download(body["global_model_uuid"])
        payload = {"metric_names": ["accuracy"], "metric_values": [accuracy(weights, self.data)]}
        async with self.session.post(f"/api/models/{body['global_model_uuid']}/metrics/", json=payload,
                                     headers=self.headers) as response:
            response.raise_for_status()

    async def swag(self, body: dict[str, Any]) -> None:
        """Send SWAG moments around the global model."""
        weights = await self.download(body["global_model_uuid"])
        first, second = await asyncio.to_thread(swag_moments, weights, self.data, self.rng)
        form = FormData()
        form.add_field("round", str(body["round"]))
        form.add_field("sample_size", str(len(self.data.y)))
        form.add_field("first_moment_file", dump_tensors(first), filename="first")
        form.add_field("second_moment_file", dump_tensors(second), filename="second")
        async with self.session.post(f"/api/models/{body['global_model_uuid']}/swag/", data=form,
                                     headers=self.headers) as response:
            response.raise_for_status()


# -- running it -----------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int) -> AsyncIterator[None]:
    """Run an aiohttp application on 127.0.0.1:port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def register(session: aiohttp.ClientSession, name: str, **extra: Any) -> dict[str, str]:
    """Register a user and return token headers."""
    async with session.post("/api/users/", json={"username": name, "password": PASSWORD, **extra}) as response:
        response.raise_for_status()
        body = await response.json()
    return {"Authorization": f"Token {body['token']}", "id": body["id"]}


def progress(done: int, total: int, started: float) -> None:
    """Redraw the progress bar on stderr."""
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rounds  {time.monotonic() - started:5.1f} s")
    sys.stderr.flush()


def training_request(
    method: str, rounds: int, clients: list[str], model_id: str, dataset_id: str
) -> dict[str, Any]:
    """The training to create for a method (FedDC counts sub-rounds: `rounds` = target × period)."""
    body: dict[str, Any] = {"model_id": model_id, "target_num_updates": rounds, "clients": clients,
                            "metric_names": ["accuracy"], "aggregation_method": "FedAvg",
                            "uncertainty_method": UNCERTAINTY[method],
                            "options": {"skip_model_tests": False,
                                        "uncertainty": {"N": PASSES, "softmax": False, "seed": 0},
                                        "evaluation": {"dataset": dataset_id}}}
    if method == "feddc":
        body["aggregation_method"] = "FedDC"
        body["target_num_updates"] = max(1, rounds // 2)
        body["options"]["daisy_chain_period"] = 2
    return body


async def follow(session: aiohttp.ClientSession, headers: dict[str, str], training_id: str, model_id: str,
                 test: Split, total: int) -> list[tuple[int, float]]:
    """Read the training's live event stream; evaluate the global model after every aggregation."""
    results: list[tuple[int, float]] = []
    started = time.monotonic()
    progress(0, total, started)
    stream_headers = {"Authorization": headers["Authorization"], "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with session.get(f"/api/trainings/{training_id}/events/", headers=stream_headers,
                           timeout=timeout) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] in {"aggregated", "daisy_chained"}:
                progress(event["round"] + 1, total, started)
            if event["type"] == "aggregated":
                async with session.get(f"/api/models/{model_id}/", headers={"Authorization": headers["Authorization"]}) as download:
                    weights = load_tensors(await download.read())
                results.append((event["round"] + 1, accuracy({k: np.array(v) for k, v in weights.items()}, test)))
            if event["type"] == "state_changed" and event["data"].get("state") in {"C", "E"}:
                if event["data"]["state"] == "E":
                    raise RuntimeError(f"the training failed: {event['data']}")
                break
    sys.stderr.write("\n")
    return results


@dataclass(frozen=True)
class UncertaintyReport:
    """How the service's inference with uncertainty did on the held-out digits."""

    method: str  # the training's uncertainty_method
    digits: int
    accuracy: float  # of the arg-max of the passes' mean
    wrong: int
    entropy_right: float  # mean predictive entropy of the right predictions
    entropy_wrong: float
    auroc: float  # of predictive entropy as a score for "the prediction is wrong"


@dataclass(frozen=True)
class DemoResult:
    """A demo run: test accuracy after each aggregation (measured here, and by the service's own
    evaluation: round → (server_accuracy, server_loss)), then inference with uncertainty."""

    rounds: list[tuple[int, float]]
    uncertainty: UncertaintyReport
    server: dict[int, tuple[float, float]]
    privacy: dict[str, Any] | None = None  # the training's ε and δ, when it was differentially private


async def upload_test_set(session: aiohttp.ClientSession, headers: dict[str, str], test: Split) -> str:
    """The held-out digits as a data set the service evaluates every new global model on."""
    buffer = io.BytesIO()
    np.savez(buffer, x=test.x, y=test.y.astype(np.int64))
    form = FormData()
    form.add_field("name", "held-out digits")
    form.add_field("dataset_file", buffer.getvalue(), filename="digits.npz")
    async with session.post("/api/datasets/", data=form, headers=headers) as response:
        response.raise_for_status()
        return str((await response.json())["id"])


async def server_scores(session: aiohttp.ClientSession, headers: dict[str, str], model_id: str,
                        rounds: int) -> dict[int, tuple[float, float]]:
    """The service's evaluation of each aggregation (they run beside the rounds: wait until all are in)."""
    async with asyncio.timeout(60):
        while True:
            async with session.get(f"/api/models/{model_id}/metrics/", headers=headers) as response:
                response.raise_for_status()
                metrics = await response.json()
            values = {(m["key"], m["step"]): m["value_float"] for m in metrics if m["reporter"] is None}
            steps = sorted(step for key, step in values if key == "server_accuracy")
            if len(steps) >= rounds:
                return {step: (values[("server_accuracy", step)], values[("server_loss", step)]) for step in steps}
            await asyncio.sleep(0.2)


def uncertainty_report(method: str, answer: dict[str, Any], labels: np.ndarray) -> UncertaintyReport:
    """Score an inference answer: accuracy, and how well predictive entropy separates wrong from right."""
    predicted = np.asarray(answer["inference"], dtype=np.float64).argmax(axis=1)
    entropy = np.asarray(answer["uncertainty"]["predictive_entropy"], dtype=np.float64)
    wrong = predicted != labels
    # Undefined when every prediction is right (or wrong): one class only.
    auroc = float(roc_auc_score(wrong, entropy)) if 0 < wrong.sum() < len(wrong) else float("nan")
    return UncertaintyReport(method, len(labels), float((~wrong).mean()), int(wrong.sum()),
                             float(entropy[~wrong].mean()) if (~wrong).any() else float("nan"),
                             float(entropy[wrong].mean()) if wrong.any() else float("nan"), auroc)


async def infer(session: aiohttp.ClientSession, headers: dict[str, str], model_id: str, method: str,
                test: Split) -> UncertaintyReport:
    """Ask the service about every held-out digit in one request and score its answer."""
    payload = {"model_id": model_id, "model_input": test.x.tolist(), "return_format": "json"}
    async with session.post("/api/inference/", json=payload, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"inference answered {response.status}: {await response.text()}")
        answer = await response.json()
    return uncertainty_report(method, answer, test.y)


async def run(method: str, rounds: int, seed: int) -> list[tuple[int, float]]:
    """Start the service and five clients, run the training, return (round, test accuracy) pairs."""
    return (await run_demo(method, rounds, seed)).rounds


def watch_hint(port: int, training_id: str) -> str:
    """Where a person watches the training live, and how to sign in."""
    return (f"watch it live: http://127.0.0.1:{port}/trainings/{training_id} "
            f"(sign in as actor / {PASSWORD}; --pace 2 slows the clients down)")


async def run_demo(method: str, rounds: int, seed: int, pace: float = 0.0, options: dict[str, Any] | None = None,
                   attacker: int | None = None, alpha: float = 0.5) -> DemoResult:
    """Start the service and five clients, run the training, then ask for inference with uncertainty."""
    shares, test = load_splits(5, seed, alpha)
    with tempfile.TemporaryDirectory(prefix="fltraining-demo-") as data_dir:
        port = free_port()
        settings = Settings(data_dir=Path(data_dir), embedded_port=0, port=port, notification_allow_loopback=True,
                            reconcile_interval_seconds=0.5, password_hash_time_cost=1)
        async with serve(create_app(settings), port), aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            clients: list[DemoClient] = []
            client_ids: list[str] = []
            async with contextlib.AsyncExitStack() as servers:
                for index, share in enumerate(shares):
                    client = DemoClient(f"client{index}", share, session, np.random.default_rng(seed + index),
                                        pace=pace, attacker=index == attacker)
                    app = web.Application()
                    app.router.add_post("/", client.on_notification)
                    client_port = free_port()
                    await servers.enter_async_context(serve(app, client_port))
                    registered = await register(session, client.name, client=True,
                                                message_endpoint=f"http://127.0.0.1:{client_port}/")
                    client_ids.append(registered.pop("id"))
                    client.headers = registered
                    clients.append(client)
                actor = await register(session, "actor", actor=True)
                actor_headers = {"Authorization": actor["Authorization"]}
                form = FormData()
                form.add_field("name", "softmax regression")
                form.add_field("description", f"8×8 pixels → {CLASSES} digits, pixel dropout {DROPOUT}")
                form.add_field("model_file", model_graph(initial_model()), filename="model.onnx")
                async with session.post("/api/models/", data=form, headers=actor_headers) as response:
                    response.raise_for_status()
                    model_id = (await response.json())["model_id"]
                dataset_id = await upload_test_set(session, actor_headers, test)
                body = training_request(method, rounds, client_ids, model_id, dataset_id)
                body["options"].update(options or {})
                async with session.post("/api/trainings/", json=body, headers=actor_headers) as response:
                    response.raise_for_status()
                    training_id = (await response.json())["training_id"]
                print(watch_hint(port, training_id), flush=True)
                print(f"accuracy of the untrained model: {accuracy(initial_model(), test):.3f} "
                      f"({len(test.y)} held-out digits, chance 0.100)")
                async with session.post(f"/api/trainings/{training_id}/start/", headers=actor_headers) as response:
                    response.raise_for_status()
                total = body["target_num_updates"] * body["options"].get("daisy_chain_period", 1)
                results = await follow(session, actor_headers, training_id, model_id, test, total)
                for client in clients:
                    if client.failures:
                        raise RuntimeError(f"{client.name} failed: {client.failures}")
                server = await server_scores(session, actor_headers, model_id, len(results))
                report = await infer(session, actor_headers, model_id, body["uncertainty_method"], test)
                async with session.get(f"/api/trainings/{training_id}/", headers=actor_headers) as response:
                    privacy = (await response.json()).get("privacy")
    return DemoResult(results, report, server, privacy)


def print_rounds(method: str, outcome: DemoResult) -> None:
    """The accuracy per aggregation as a Markdown table: measured here, and by the service's evaluation."""
    print(f"\n{method}: global model accuracy on held-out digits after each aggregation")
    print("| round | test accuracy (here) | server_accuracy | server_loss |\n|---|---|---|---|")
    for round_, score in outcome.rounds:
        server_accuracy, server_loss = outcome.server.get(round_, (float("nan"), float("nan")))
        print(f"| {round_} | {score:.3f} | {server_accuracy:.3f} | {server_loss:.3f} |")


def print_uncertainty(rows: list[tuple[str, UncertaintyReport]]) -> None:
    """The inference results as a Markdown table, one row per training."""
    digits = rows[0][1].digits
    print(f"\nPOST /api/inference/ on the {digits} held-out digits ({PASSES} passes; "
          "AUROC: predictive entropy as a score for \"the prediction is wrong\", "
          "0.5 = no better than chance)")
    print("| training | uncertainty | accuracy | wrong | mean entropy, right | mean entropy, wrong | AUROC |")
    print("|---|---|---|---|---|---|---|")
    for method, report in rows:
        print(f"| {method} | {report.method} | {report.accuracy:.3f} | {report.wrong} "
              f"| {report.entropy_right:.3f} | {report.entropy_wrong:.3f} | {report.auroc:.3f} |")


def main() -> None:
    """Parse options, run the demo, print the accuracy per round and the inference's uncertainty."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=[*METHODS, "all"], default="fedavg",
                        help="all: every method in turn, then one table comparing their uncertainty")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.0,
                        help="seconds each client pretends to train per round, to watch the rounds on the dashboard")
    args = parser.parse_args()
    rows: list[tuple[str, UncertaintyReport]] = []
    for method in METHODS if args.method == "all" else (args.method,):
        if rows:
            print()
        outcome = asyncio.run(run_demo(method, args.rounds, args.seed, args.pace))
        print_rounds(method, outcome)
        if args.method != "all":
            print_uncertainty([(method, outcome.uncertainty)])
        rows.append((method, outcome.uncertainty))
    if args.method == "all":
        print_uncertainty(rows)


if __name__ == "__main__":
    main()
