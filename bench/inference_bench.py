"""Inference benchmark: `POST /api/inference/` against onnxruntime called directly in this process.

The model is a 1 M-parameter MLP built with `onnx.helper` (x [batch, 784] → MatMul 784×1024 + Add +
Relu → Dropout 0.2 → MatMul 1024×256 + Add + Relu → MatMul 256×10 + Add → y [batch, 10], opset 17,
float32 weights from a seeded NumPy generator), uploaded twice as an .onnx model: one model without
a training (uncertainty NONE: one pass) and one whose training has `uncertainty_method` MC_DROPOUT
with `options.uncertainty.N = 10` (ten passes with Dropout in training mode, which the service stacks
along the free batch dimension into one onnxruntime run).

For every case (NONE, MC_DROPOUT N=10), batch size (1, 64) and number of connections (1, 4):
- direct: `onnxruntime.InferenceSession` on the graph, default options (one intra-op thread per
  core) and, for comparison, `intra_op_num_threads=1` (the service's sessions use one thread each, on
  two pool threads); as many threads as connections call it in a loop. NONE is one run plus the
  arg-max; MC_DROPOUT runs the graph with Dropout's `training_mode` input a constant True on the
  input tiled 10× along the batch axis, then the mean, unbiased variance and std over the passes in
  float64 (the service's work). Its sessions disable onnxruntime's `EliminateDropout` rewrite, which
  otherwise removes every Dropout whose mask is unused, training_mode or not (all passes equal).
- service: one `fltraining serve` process (1 worker) on the embedded store in a temporary directory;
  wrk-style connections each send their next request as soon as the previous answer arrived. The
  request is JSON (`model_input` as nested lists of the float32 values) or, as a second input format,
  multipart with the input as a `.npy` file; both ask for `return_format: json`. Bodies are encoded
  once, before measuring.
Each measurement runs `--warmup` seconds (direct: 0.5 s), then counts the answers that complete in
the next `--seconds`; latencies are those answers' request-to-body times. Any non-200 answer or
transport error is an error: its row's ratio is not a valid figure. Before measuring, one answer per
case, batch and input format is checked against the direct computation (NONE: `outputs` allclose
and the same arg-max; MC_DROPOUT, whose passes are random: shapes, finite values, and a std between
the passes above 1e-3 of the outputs' scale, as stacked rows of one input differ by rounding alone,
~1e-7); a row whose check failed is not a valid figure either. CPU of the service, its store and
this process (the load generator; the direct baseline is idle meanwhile) is read from /proc while
the service is measured.

Targets (from the issue): the service reaches ≥ 0.7 × direct requests/s at batch 64; MC_DROPOUT N=10
costs ≤ 3× NONE (requests/s of NONE over MC_DROPOUT's, same batch and connections). Exit status 1
when a request failed or an answer check failed.
Usage: `python bench/inference_bench.py [--quick] [--seconds 4] [--connections 1,4]
[--set FLTRAINING_INFERENCE_THREADS=2]` (or `make bench-inference ARGS=...`).
"""

import argparse
import asyncio
import io
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load import CLK_TCK, Sample, Sampler, _json, percentile, register

from tests.processes import ServiceProcess

FEATURES = 784
LAYERS = ((784, 1024), (1024, 256), (256, 10))
CLASSES = LAYERS[-1][1]
DROPOUT_RATIO = 0.2
OPSET = 17
IR_VERSION = 9  # the installed onnx's default IR version can be newer than onnxruntime reads
SEED = 0
PASSES = 10
NONE, MC_DROPOUT = "NONE", "MC_DROPOUT"
CASES = (NONE, MC_DROPOUT)
FORMATS = ("json", "npy")
TARGET_BATCH = 64
MIN_RATIO = 0.7
MAX_MC_COST = 3.0
DIRECT_WARMUP = 0.5  # an in-process session has no connections to open: a few runs warm it
QUICK_SECONDS, QUICK_WARMUP = 1.0, 0.3
RTOL, ATOL = 1e-4, 1e-4
MIN_SPREAD = 1e-3  # of the outputs' scale: real dropout gives std ~0.3 of it, rounding ~1e-7
ELIMINATE_DROPOUT = "EliminateDropout"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)
ERROR_EXAMPLES = 5
ERROR_TEXT = 200


# --- the model ---------------------------------------------------------------------------------


def mlp_weights(seed: int) -> dict[str, np.ndarray]:
    """The MLP's float32 weights and biases (He-scaled normal weights, small biases)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for index, (rows, columns) in enumerate(LAYERS, start=1):
        weights[f"w{index}"] = (rng.standard_normal((rows, columns)) * np.sqrt(2 / rows)).astype(np.float32)
        weights[f"b{index}"] = (0.01 * rng.standard_normal(columns)).astype(np.float32)
    return weights


def mlp_graph(weights: dict[str, np.ndarray], dropout_training: bool) -> bytes:
    """The MLP as an ONNX file; with `dropout_training` its Dropout's training_mode is a constant True."""
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array(DROPOUT_RATIO, np.float32), "dropout.ratio"))
    dropout_inputs = ["r1", "dropout.ratio"]
    if dropout_training:
        initializers.append(numpy_helper.from_array(np.array(True), "dropout.training_mode"))
        dropout_inputs.append("dropout.training_mode")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("Dropout", dropout_inputs, ["d1"]),
        helper.make_node("MatMul", ["d1", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["m3"]), helper.make_node("Add", ["m3", "b3"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, CLASSES])
    graph = helper.make_graph(nodes, "mlp", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def parameter_count(weights: dict[str, np.ndarray]) -> int:
    """Weights and biases in all."""
    return sum(value.size for value in weights.values())


# --- the direct baseline -------------------------------------------------------------------------


def direct_session(graph: bytes, threads: int | None,
                   keep_dropout: bool = False) -> onnxruntime.InferenceSession:
    """A session with default options, or with `threads` intra-op threads; `keep_dropout` for MC dropout."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # onnxruntime's EliminateDropout rule removes every Dropout whose mask output is unused, training_mode
    # or not: without disabling it the "MC" passes are all the same eval pass.
    disabled = [ELIMINATE_DROPOUT] if keep_dropout else []
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=disabled)


def spread_problem(mean: np.ndarray, std: np.ndarray) -> str | None:
    """Why the passes' std is no real spread (rounding between stacked rows is ~1e-7), or None."""
    scale = max(1.0, float(np.abs(mean).max()))
    if float(std.max()) <= MIN_SPREAD * scale:
        return (f"no spread between the passes (max std {float(std.max()):.2g}, outputs up to {scale:.2g}): "
                "Dropout did not run in training mode")
    return None


def run_none(session: onnxruntime.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pass: the outputs and their arg-max per row."""
    output = session.run(None, {"x": x})[0]
    return output, output.argmax(axis=1)


def run_mc(session: onnxruntime.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PASSES passes stacked along the batch axis in one run: their mean, unbiased variance and std."""
    output = session.run(None, {"x": np.concatenate([x] * PASSES)})[0]
    passes = output.reshape(PASSES, x.shape[0], *output.shape[1:]).astype(np.float64)
    variance = passes.var(axis=0, ddof=1)
    return passes.mean(axis=0), variance, np.sqrt(variance)


@dataclass
class Run:
    """One measurement: latencies of the answers completed in the window, and errors."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Answers per second."""
        return len(self.latencies) / self.seconds

    def p(self, fraction: float) -> float:
        """A latency percentile in ms."""
        return percentile(self.latencies, fraction)

    @property
    def valid(self) -> bool:
        """Whether it measured something and saw no error."""
        return bool(self.latencies) and not self.errors

    def fail(self, text: str) -> None:
        """Count an error and keep the first few."""
        self.errors += 1
        if len(self.examples) < ERROR_EXAMPLES:
            self.examples.append(text[:ERROR_TEXT])


@dataclass(frozen=True)
class Window:
    """When a measurement warms up, starts counting and stops."""

    start: float
    end: float

    @classmethod
    def after(cls, warmup: float, seconds: float) -> "Window":
        """A window beginning `warmup` seconds from now."""
        start = time.perf_counter() + warmup
        return cls(start, start + seconds)

    def counts(self, finished: float) -> bool:
        """Whether an answer finished inside the window."""
        return self.start <= finished <= self.end


def measure_direct(job: Callable[[], object], connections: int, warmup: float, seconds: float) -> Run:
    """`connections` threads call `job` back to back; answers finished within the window count."""
    run = Run(seconds)
    window = Window.after(warmup, seconds)

    def loop() -> list[float]:
        mine: list[float] = []
        while (started := time.perf_counter()) < window.end:
            job()
            finished = time.perf_counter()
            if window.counts(finished):
                mine.append(finished - started)
        return mine

    with ThreadPoolExecutor(max_workers=connections) as pool:
        loops = [pool.submit(loop) for _ in range(connections)]
        for done in loops:
            run.latencies.extend(done.result())  # a failing baseline stops the bench: it would be no baseline
    return run


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A request body encoded once, with its content type."""

    data: bytes
    content_type: str


def json_body(model_id: str, x: np.ndarray) -> Body:
    """`{model_id, model_input, return_format}` with the input's float32 values as JSON numbers."""
    text = json.dumps({"model_id": model_id, "model_input": x.tolist(), "return_format": "json"})
    return Body(text.encode(), "application/json")


def npy_body(model_id: str, x: np.ndarray) -> Body:
    """Multipart `model_id`, `return_format` and `model_input` as a .npy file."""
    array = io.BytesIO()
    np.save(array, x, allow_pickle=False)
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in (("model_id", model_id), ("return_format", "json"))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="model_input"; filename="x.npy"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + array.getvalue() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return Body(b"".join(parts), f"multipart/form-data; boundary={boundary}")


BODIES: dict[str, Callable[[str, np.ndarray], Body]] = {"json": json_body, "npy": npy_body}


@dataclass(frozen=True)
class Fixture:
    """A registered actor and the two uploaded models."""

    headers: dict[str, str]
    models: dict[str, str]  # by case


async def upload(session: aiohttp.ClientSession, base: str, headers: dict[str, str], graph: bytes,
                 name: str) -> str:
    """Upload the graph as an .onnx model; its id."""
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("description", "inference benchmark MLP")
    form.add_field("model_file", graph, filename="mlp.onnx", content_type="application/octet-stream")
    created = await _json(session, "POST", base + "/api/models/", 201, data=form, headers=headers)
    return str(created["model_id"])


async def prepare(session: aiohttp.ClientSession, base: str, graph: bytes) -> Fixture:
    """An actor, a model without a training (NONE) and one whose training uses MC_DROPOUT N=10."""
    user = await register(session, base, "inference")
    headers = {"Authorization": f"Token {user['token']}"}
    models = {case: await upload(session, base, headers, graph, f"mlp {case}") for case in CASES}
    training = {"model_id": models[MC_DROPOUT], "target_num_updates": 1, "uncertainty_method": MC_DROPOUT,
                "options": {"uncertainty": {"N": PASSES}}, "clients": []}
    await _json(session, "POST", base + "/api/trainings/", 201, json=training, headers=headers)
    return Fixture(headers, models)


async def post(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               body: Body) -> tuple[int, bytes]:
    """Send one inference request; the status and the body."""
    headers = {**headers, "Content-Type": body.content_type}
    async with session.post(url, data=body.data, headers=headers) as answer:
        return answer.status, await answer.read()


async def measure_service(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: Body,
                          connections: int, warmup: float, seconds: float) -> Run:
    """`connections` loops, each sending its next request when the previous answer arrived."""
    run = Run(seconds)
    window = Window.after(warmup, seconds)

    async def loop() -> None:
        while (started := time.perf_counter()) < window.end:
            try:
                status, data = await post(session, url, headers, body)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                run.fail(f"{type(error).__name__}: {error}")
                continue
            finished = time.perf_counter()
            if status != 200:
                run.fail(f"{status}: {data[:ERROR_TEXT]!r}")
            elif window.counts(finished):
                run.latencies.append(finished - started)

    await asyncio.gather(*(loop() for _ in range(connections)))
    return run


def check_none(answer: dict[str, Any], x: np.ndarray, session: onnxruntime.InferenceSession) -> str | None:
    """NONE: the service's raw outputs equal a direct run's, and so does the arg-max; else the difference."""
    outputs, classes = run_none(session, x)
    served = np.asarray(answer.get("outputs"), dtype=np.float64)
    if served.shape != outputs.shape:
        return f"outputs shape {served.shape}, direct {outputs.shape}"
    if not np.allclose(served, outputs, rtol=RTOL, atol=ATOL):
        return f"outputs differ from direct (max |Δ| {np.abs(served - outputs).max():.3g})"
    if not np.array_equal(np.asarray(answer["inference"]), classes):
        return "arg-max differs from direct"
    return None


def check_mc(answer: dict[str, Any], x: np.ndarray) -> str | None:
    """MC_DROPOUT: mean, variance and std of the right shape, finite, with some spread (the passes differ)."""
    expected = (x.shape[0], CLASSES)
    mean = np.asarray(answer.get("inference"), dtype=np.float64)
    uncertainty = answer.get("uncertainty", {})
    arrays = {"inference": mean, **{name: np.asarray(uncertainty.get(name), dtype=np.float64)
                                    for name in ("variance", "std")}}
    for name, array in arrays.items():
        if array.shape != expected or not np.isfinite(array).all():
            return f"{name}: shape {array.shape} (expected {expected}) or not finite"
    return spread_problem(mean, arrays["std"])


async def check(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: Body, case: str,
                x: np.ndarray, eval_session: onnxruntime.InferenceSession) -> str | None:
    """One answer compared with the direct computation; the problem, or None."""
    status, data = await post(session, url, headers, body)
    if status != 200:
        return f"{status}: {data[:ERROR_TEXT]!r}"
    answer = json.loads(data)
    return check_none(answer, x, eval_session) if case == NONE else check_mc(answer, x)


# --- measuring everything ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One case, batch size and number of connections."""

    case: str
    batch: int
    connections: int


@dataclass
class Served:
    """A service measurement with the CPU used meanwhile (cores)."""

    run: Run
    service_cpu: float
    store_cpu: float
    client_cpu: float


@dataclass
class Results:
    """Every measurement of the run, and the answers' checks."""

    direct: dict[tuple[Cell, str], Run] = field(default_factory=dict)  # by cell and "default" / "1 thread"
    served: dict[tuple[Cell, str], Served] = field(default_factory=dict)  # by cell and input format
    checks: dict[tuple[str, int, str], str] = field(default_factory=dict)  # problem by case, batch, format

    def flaw(self, cell: Cell, fmt: str | None, variant: str) -> str | None:
        """Why a service (or, without `fmt`, a direct) figure of a cell is not valid, or None."""
        runs = [self.direct[cell, variant]] + ([self.served[cell, fmt].run] if fmt else [])
        if not all(run.valid for run in runs):
            return "errors"
        if fmt and (cell.case, cell.batch, fmt) in self.checks:
            return "answer check failed"
        return None

    def service_ratio(self, cell: Cell, fmt: str, variant: str) -> float:
        """Service req/s over direct req/s."""
        return self.served[cell, fmt].run.rate / max(self.direct[cell, variant].rate, 1e-9)

    def mc_cost(self, batch: int, connections: int, fmt: str | None,
                variant: str) -> tuple[float, str | None]:
        """NONE's req/s over MC_DROPOUT's (service with `fmt`, else direct), and why it is invalid."""
        cells = {case: Cell(case, batch, connections) for case in CASES}
        rates = {case: self.served[cell, fmt].run.rate if fmt else self.direct[cell, variant].rate
                 for case, cell in cells.items()}
        flaws = [flaw for cell in cells.values() if (flaw := self.flaw(cell, fmt, variant))]
        return rates[NONE] / max(rates[MC_DROPOUT], 1e-9), (flaws[0] if flaws else None)


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    batches: tuple[int, ...]
    connections: tuple[int, ...]
    formats: tuple[str, ...]
    warmup: float
    seconds: float


def direct_jobs(graphs: dict[str, bytes], inputs: dict[int, np.ndarray]
                ) -> dict[tuple[str, int, str], Callable[[], object]]:
    """The direct computation of every case and batch, with default options and with one thread."""
    jobs: dict[tuple[str, int, str], Callable[[], object]] = {}
    for variant, threads in (("default", None), ("1 thread", 1)):
        sessions = {case: direct_session(graphs[case], threads, keep_dropout=case == MC_DROPOUT)
                    for case in CASES}
        for batch, x in inputs.items():
            jobs[NONE, batch, variant] = partial(run_none, sessions[NONE], x)
            jobs[MC_DROPOUT, batch, variant] = partial(run_mc, sessions[MC_DROPOUT], x)
    return jobs


def check_direct_dropout(graph: bytes, inputs: dict[int, np.ndarray]) -> None:
    """Make sure the direct MC_DROPOUT baseline really drops (RuntimeError otherwise)."""
    session = direct_session(graph, None, keep_dropout=True)
    for batch, x in inputs.items():
        mean, _, std = run_mc(session, x)
        if problem := spread_problem(mean, std):
            raise RuntimeError(f"the direct MC_DROPOUT baseline is wrong at batch {batch}: {problem}")


@dataclass(frozen=True)
class Target:
    """The running service as the measurements need it."""

    session: aiohttp.ClientSession
    url: str
    headers: dict[str, str]
    sampler: Sampler  # read on demand: one reading before and one after each measurement


def cores(first: Sample, last: Sample) -> tuple[float, float]:
    """Mean CPU cores of the service and of its store between two readings."""
    elapsed_ticks = max(last.at - first.at, 1e-9) * CLK_TCK
    service = last.service_ticks - first.service_ticks
    return service / elapsed_ticks, (last.store_ticks - first.store_ticks) / elapsed_ticks


async def measure_served(target: Target, body: Body, connections: int, plan: Plan) -> Served:
    """One service measurement with the CPU it took (warm-up included: the same load)."""
    first, client_started, started = target.sampler.read(), time.process_time(), time.monotonic()
    run = await measure_service(target.session, target.url, target.headers, body, connections,
                                plan.warmup, plan.seconds)
    service_cpu, store_cpu = cores(first, target.sampler.read())
    client_cpu = (time.process_time() - client_started) / (time.monotonic() - started)
    return Served(run, service_cpu, store_cpu, client_cpu)


async def measure_cell(results: Results, cell: Cell, jobs: dict[tuple[str, int, str], Callable[[], object]],
                       bodies: dict[tuple[str, int, str], Body], target: Target, plan: Plan) -> None:
    """Direct (both variants) then the service (every format) for one cell."""
    print(f"measuring {cell.case}, batch {cell.batch}, {cell.connections} connection(s)", flush=True)
    for variant in ("default", "1 thread"):
        job = jobs[cell.case, cell.batch, variant]
        results.direct[cell, variant] = await asyncio.to_thread(
            measure_direct, job, cell.connections, DIRECT_WARMUP, plan.seconds)
    for fmt in plan.formats:
        results.served[cell, fmt] = await measure_served(target, bodies[cell.case, cell.batch, fmt],
                                                         cell.connections, plan)


async def measure_all(service: ServiceProcess, graphs: dict[str, bytes], plan: Plan) -> Results:
    """Set the service up, check its answers, then measure every cell directly and through it."""
    results = Results()
    rng = np.random.default_rng(SEED + 1)
    inputs = {batch: rng.standard_normal((batch, FEATURES)).astype(np.float32) for batch in plan.batches}
    jobs = direct_jobs(graphs, inputs)
    check_direct_dropout(graphs[MC_DROPOUT], inputs)
    eval_session = direct_session(graphs[NONE], None)
    assert service.process is not None
    url = service.base_url + "/api/inference/"
    connector = aiohttp.TCPConnector(limit=max(plan.connections))
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        fixture = await prepare(session, service.base_url, graphs[NONE])
        bodies = {(case, batch, fmt): BODIES[fmt](fixture.models[case], x)
                  for case in CASES for batch, x in inputs.items() for fmt in plan.formats}
        for (case, batch, fmt), body in bodies.items():
            if problem := await check(session, url, fixture.headers, body, case, inputs[batch], eval_session):
                results.checks[case, batch, fmt] = problem
        target = Target(session, url, fixture.headers, Sampler(service.process.pid))
        for case in CASES:
            for batch in plan.batches:
                for connections in plan.connections:
                    await measure_cell(results, Cell(case, batch, connections), jobs, bodies, target, plan)
    return results


# --- the report ------------------------------------------------------------------------------------


def case_label(case: str) -> str:
    """'NONE' or 'MC_DROPOUT N=10'."""
    return case if case == NONE else f"{case} N={PASSES}"


def flagged(text: str, flaw: str | None) -> str:
    """A figure, marked when it is not valid."""
    return text if flaw is None else f"{text}, invalid: {flaw}"


def run_cells(run: Run) -> str:
    """'req/s | p50 | p99' of one run."""
    return f"{run.rate:,.1f} | {run.p(0.5):.2f} | {run.p(0.99):.2f}"


def main_table(results: Results) -> list[str]:
    """Service and direct side by side for every cell and input format."""
    lines = [
        ("| case | input | batch | conns | service req/s | p50 ms | p99 ms | CPU svc / store / bench | "
         "direct req/s | p50 ms | p99 ms | service/direct | direct 1-thread req/s | p50 ms | p99 ms "
         "| service/direct 1-thread | errors |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (cell, fmt), served in results.served.items():
        direct, single = results.direct[cell, "default"], results.direct[cell, "1 thread"]
        ratios = [flagged(f"{results.service_ratio(cell, fmt, variant):.2f}",
                          results.flaw(cell, fmt, variant)) for variant in ("default", "1 thread")]
        lines.append(
            f"| {case_label(cell.case)} | {fmt} | {cell.batch} | {cell.connections} "
            f"| {run_cells(served.run)} "
            f"| {served.service_cpu:.2f} / {served.store_cpu:.2f} / {served.client_cpu:.2f} "
            f"| {run_cells(direct)} | {ratios[0]} | {run_cells(single)} | {ratios[1]} "
            f"| {served.run.errors + direct.errors + single.errors} |")
    return lines


def cost_text(cost: float, flaw: str | None) -> str:
    """'2.40× (met)' against MAX_MC_COST, marked when not valid."""
    return flagged(f"{cost:.2f}× ({'met' if cost <= MAX_MC_COST else 'NOT met'})", flaw)


def cost_table(results: Results, plan: Plan) -> list[str]:
    """MC_DROPOUT N=10 cost over NONE's per batch and connections, through the service and directly."""
    sources: list[tuple[str, str | None, str]] = [(f"service {fmt}", fmt, "default") for fmt in plan.formats]
    sources += [("direct", None, "default"), ("direct 1-thread", None, "1 thread")]
    lines = ["| batch | conns | " + " | ".join(f"{name}: MC ÷ NONE" for name, _, _ in sources) + " |",
             "|---:|---:|" + "---:|" * len(sources)]
    for batch in plan.batches:
        for conns in plan.connections:
            costs = [cost_text(*results.mc_cost(batch, conns, fmt, variant)) for _, fmt, variant in sources]
            lines.append(f"| {batch} | {conns} | " + " | ".join(costs) + " |")
    return lines


def verdict(passed: list[bool], flaws: list[str | None]) -> str:
    """'met' when every figure passes and is valid; 'NOT met' when a valid one fails; else 'UNDECIDED'."""
    if any(not ok and flaw is None for ok, flaw in zip(passed, flaws, strict=True)):
        return "NOT met"
    if invalid := sorted({flaw for flaw in flaws if flaw}):
        return f"UNDECIDED (invalid: {', '.join(invalid)})"
    return "met"


def ratio_verdict(results: Results, plan: Plan, fmt: str) -> str:
    """Whether the service reaches MIN_RATIO of direct (default options) at TARGET_BATCH, for one format."""
    label = f"service ≥ {MIN_RATIO} × direct at batch {TARGET_BATCH}, {fmt} input"
    cells = [cell for cell, used in results.served if used == fmt and cell.batch == TARGET_BATCH]
    if not cells:
        return f"{label}: not measured"
    ratios = [results.service_ratio(cell, fmt, "default") for cell in cells]
    flaws = [results.flaw(cell, fmt, "default") for cell in cells]
    figures = ", ".join(f"{case_label(cell.case)} × {cell.connections} conn(s): {ratio:.2f}"
                        for cell, ratio in zip(cells, ratios, strict=True))
    return f"{label}: {verdict([ratio >= MIN_RATIO for ratio in ratios], flaws)} ({figures})"


def cost_verdict(results: Results, plan: Plan, fmt: str) -> str:
    """Whether MC_DROPOUT costs at most MAX_MC_COST × NONE through the service, per batch."""
    parts = []
    for batch in plan.batches:
        costs = [results.mc_cost(batch, connections, fmt, "default") for connections in plan.connections]
        outcome = verdict([cost <= MAX_MC_COST for cost, _ in costs], [flaw for _, flaw in costs])
        figures = " / ".join(f"{cost:.2f}×" for cost, _ in costs)
        connections = "/".join(map(str, plan.connections))
        parts.append(f"batch {batch}: {outcome} ({figures} at {connections} conn(s))")
    label = f"MC_DROPOUT N={PASSES} ≤ {MAX_MC_COST:g}× NONE through the service, {fmt} input"
    return f"{label}: " + "; ".join(parts)


def error_lines(results: Results) -> list[str]:
    """Failed checks and the first errors of every measurement."""
    lines = [f"- answer check, {case_label(case)}, batch {batch}, {fmt}: {problem}"
             for (case, batch, fmt), problem in results.checks.items()]
    for (cell, fmt), served in results.served.items():
        where = f"service, {fmt}, {case_label(cell.case)}, batch {cell.batch}, {cell.connections} conn(s)"
        lines += [f"- {where}: {served.run.errors} error(s), e.g. {example}"
                  for example in served.run.examples[:1]]
    return lines


def report(results: Results, plan: Plan) -> list[str]:
    """The tables, the verdicts and the errors."""
    lines = ["", *main_table(results), "", *cost_table(results, plan), "", "Targets:"]
    lines += [f"- {ratio_verdict(results, plan, fmt)}" for fmt in plan.formats]
    lines += [f"- {cost_verdict(results, plan, fmt)}" for fmt in plan.formats]
    checked = len(CASES) * len(plan.batches) * len(plan.formats)
    lines.append(f"- answers as the direct computation's: {'yes' if not results.checks else 'NO'} "
                 f"({len(results.checks)} of {checked} checks failed)")
    errors = error_lines(results)
    if errors:
        lines += ["", "Errors:", *errors]
    return lines


def service_log_lines(service: ServiceProcess) -> list[str]:
    """The service's error lines, shortened."""
    logged = [line for line in service.log().splitlines() if " ERROR " in line or "Traceback" in line]
    return [f"service log: {len(logged)} error line(s)"] + [f"  {line[:300]}" for line in logged[:5]]


# --- main -----------------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    """'1,4' → (1, 4)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell and target")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring the service")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: --seconds {QUICK_SECONDS:g} --warmup {QUICK_WARMUP:g}")
    parser.add_argument("--batches", type=int_list, default=(1, TARGET_BATCH),
                        help="batch sizes (default 1,64)")
    parser.add_argument("--connections", type=int_list, default=(1, 4),
                        help="concurrent connections (default 1,4)")
    parser.add_argument("--formats", type=lambda text: tuple(text.split(",")), default=FORMATS,
                        help="service request formats: json, npy (default both)")
    parser.add_argument("--set", action="append", default=[], metavar="FLTRAINING_NAME=VALUE",
                        help="service setting for this run (repeatable)")
    args = parser.parse_args(argv)
    if any(not item.startswith("FLTRAINING_") or "=" not in item for item in args.set):
        parser.error("--set takes FLTRAINING_NAME=VALUE")
    if any(fmt not in FORMATS for fmt in args.formats):
        parser.error(f"--formats takes {', '.join(FORMATS)}")
    if args.quick:
        args.seconds, args.warmup = QUICK_SECONDS, QUICK_WARMUP
    return args


def load_text(load: tuple[float, float, float]) -> str:
    """'0.52 0.37 0.18'."""
    return " ".join(f"{value:.2f}" for value in load)


def header(args: argparse.Namespace, plan: Plan, parameters: int, seconds: float,
           load_before: tuple[float, float, float]) -> list[str]:
    """What ran, on what, for how long."""
    settings = ", ".join(args.set) or "default settings"
    return [
        (f"Inference, MLP of {parameters:,} float32 parameters, 1 service worker on the embedded store "
         f"({settings}), {plan.seconds:g} s per measurement after {plan.warmup:g} s (direct: "
         f"{DIRECT_WARMUP:g} s), {seconds:.0f} s in all"),
        (f"Command: `{shlex.join(sys.orig_argv)}`; {os.cpu_count()} CPUs; "
         f"onnxruntime {onnxruntime.__version__}; "
         f"load average before {load_text(load_before)}, after {load_text(os.getloadavg())}"),
        "Direct figures do not depend on the input format: both formats' rows show the same measurement.",
    ]


def main() -> None:
    """Build the model, measure, print the report; exit status 1 on errors or a wrong answer."""
    args = parse_args()
    plan = Plan(args.batches, args.connections, args.formats, args.warmup, args.seconds)
    env = dict(item.split("=", 1) for item in args.set)
    weights = mlp_weights(SEED)
    graphs = {NONE: mlp_graph(weights, dropout_training=False),
              MC_DROPOUT: mlp_graph(weights, dropout_training=True)}
    load_before, started = os.getloadavg(), time.monotonic()
    with (tempfile.TemporaryDirectory(prefix="fltraining-inference-bench-") as data,
          ServiceProcess(Path(data), env=env) as service):
        results = asyncio.run(measure_all(service, graphs, plan))
        logged = service_log_lines(service)
    print()
    print("\n".join(header(args, plan, parameter_count(weights), time.monotonic() - started, load_before)))
    print("\n".join([*report(results, plan), "", *logged]))
    failed = bool(results.checks) or any(served.run.errors for served in results.served.values())
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()
