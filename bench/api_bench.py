"""HTTP benchmark of fltraining on the embedded store, against a bare aiohttp + PyMongo baseline.

wrk-style: a fixed number of keep-alive connections (1 and 32), each sending its next request as soon as
the previous answer arrived, for --seconds after a warm-up. Every request kind runs on the service and on
the bare server (bench/bare_server.py, same store, same store operations), interleaved so both see the same
store size. Prints one table (req/s, p50/p99, CPU ms per request of the service or bare process and of the
store, from /proc, errors, service/bare ratio), then the targets, the DLR comparison and the embedded
store's insert rate as it fills.
Usage: `python bench/api_bench.py [--seconds 5] [--quick] [--workers 1,2]` (or `make bench`).
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bare_server import training_document  # noqa: E402  (bench/ is on sys.path as the script's folder)
from load import CLK_TCK, Sampler, _json, model_form, percentile, register  # noqa: E402

from fltraining.storage.database import init_database, make_client  # noqa: E402
from fltraining.storage.embedded import EmbeddedStore  # noqa: E402
from tests.processes import ServiceProcess, free_port  # noqa: E402

BARE = "bare aiohttp+PyMongo"
GET_ONE = "GET /api/trainings/{id}/"
GET_ONE_304 = "GET /api/trainings/{id}/, 304"
LIST = "GET /api/trainings/ (100)"
LIST_304 = "GET /api/trainings/ (100), 304"
POST = "POST /api/trainings/"
# Read-only kinds first, so the lists hold exactly the 100 prepared trainings; the POSTs then grow the store.
KINDS = (GET_ONE, GET_ONE_304, LIST, LIST_304, POST)
# DLR's req/s at 32 connections, same machine type and request shapes (issue 11).
DLR = {GET_ONE: (85, 94), LIST: (7, 23), POST: (49, 81)}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)

Ticks = Callable[[], tuple[int, int]]  # CPU ticks so far of (the serving process tree, the store)


@dataclass(frozen=True)
class Scenario:
    """One request kind as a target serves it."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    expected: frozenset[int] = frozenset({200})


@dataclass
class Target:
    """A server under test: its scenarios and how to read its CPU."""

    name: str
    scenarios: dict[str, Scenario]
    ticks: Ticks


@dataclass
class Result:
    """One measured scenario."""

    target: str
    scenario: str
    connections: int
    requests: float  # completed within the window, the ones overlapping its edges pro rata
    errors: int  # unexpected answers and transport errors completed within the window
    seconds: float
    latencies: list[float]
    server_cpu: float  # seconds, the service tree without the store (or the bare process)
    store_cpu: float
    client_cpu: float
    opened: int  # TCP connections the client opened, warm-up included
    first_error: str = ""

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    def ms_per_request(self, cpu_seconds: float) -> float:
        """CPU milliseconds per request (NaN without requests)."""
        return 1000 * cpu_seconds / self.requests if self.requests else float("nan")


# --- the load generator -------------------------------------------------------------------------


async def _send(session: aiohttp.ClientSession, scenario: Scenario) -> int:
    """One request, body read; its status."""
    async with session.request(scenario.method, scenario.url, headers=scenario.headers,
                               json=scenario.body) as response:
        await response.read()
        return response.status


async def drive(target: Target, name: str, connections: int, warmup: float, seconds: float) -> Result:
    """`connections` keep-alive connections in closed loops, measured over `seconds` after a warm-up."""
    scenario = target.scenarios[name]
    opened = 0

    async def count_connection(*_: Any) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count_connection)
    # limit = connections: every loop holds one pooled connection, so exactly that many stay open.
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, keepalive_timeout=300)
    done: list[tuple[float, float, bool]] = []  # start, completion, expected status
    failures: list[str] = []
    stop = False

    session = aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT, trace_configs=[trace])
    async with session:

        async def loop() -> None:
            while not stop:
                started = time.perf_counter()
                try:
                    status = await _send(session, scenario)
                    ok = status in scenario.expected
                    if not ok:
                        failures.append(f"status {status}")
                except (aiohttp.ClientError, OSError, TimeoutError) as error:
                    ok = False
                    failures.append(f"{type(error).__name__}: {error}")
                finished = time.perf_counter()
                done.append((started, finished, ok))

        loops = [asyncio.create_task(loop()) for _ in range(connections)]
        await asyncio.sleep(warmup)
        first, client_first, window_start = target.ticks(), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        last, client_last, window_end = target.ticks(), time.process_time(), time.perf_counter()
        stop = True
        await asyncio.gather(*loops)
    # A request counts for the share of its duration inside the window: at 32 connections a slow kind
    # takes about a second each, and counting whole completions would quantise the rate by ±32 per window.
    requests = sum(max(0.0, min(end, window_end) - max(start, window_start)) / max(end - start, 1e-9)
                   for start, end, _ in done)
    window = [(end - start, ok) for start, end, ok in done if window_start <= end <= window_end]
    return Result(
        target.name, name, connections, requests, sum(not ok for _, ok in window), window_end - window_start,
        [latency for latency, _ in window], (last[0] - first[0]) / CLK_TCK, (last[1] - first[1]) / CLK_TCK,
        client_last - client_first, opened, failures[0] if failures else "",
    )


# --- fixture and targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    """An actor with one model used by 100 trainings."""

    headers: dict[str, str]
    actor: str
    model_id: str
    training_id: str


async def prepare_service(base: str) -> Fixture:
    """A user, one model and 100 trainings of it (99 of them on clones), as the list scenario needs."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        user = await register(session, base, "bench")
        headers = {"Authorization": f"Token {user['token']}"}
        model = await _json(session, "POST", base + "/api/models/", 201, data=model_form(), headers=headers)
        training_ids = []
        for _ in range(100):
            body = {"model_id": model["model_id"], "target_num_updates": 5,
                    "options": {"daisy_chain_period": 2}}
            created = await _json(session, "POST", base + "/api/trainings/", 201, json=body, headers=headers)
            training_ids.append(created["training_id"])
    return Fixture(headers, user["id"], model["model_id"], training_ids[0])


def service_scenarios(base: str, fixture: Fixture) -> dict[str, Scenario]:
    """The benchmarked service requests (the 304 kinds get their If-None-Match in `arm_conditionals`)."""
    one = Scenario("GET", f"{base}/api/trainings/{fixture.training_id}/", fixture.headers)
    page = Scenario("GET", f"{base}/api/trainings/?limit=100", fixture.headers)
    body = {"model_id": fixture.model_id, "target_num_updates": 5}
    return {
        GET_ONE: one, GET_ONE_304: replace(one, expected=frozenset({304})),
        LIST: page, LIST_304: replace(page, expected=frozenset({304})),
        POST: Scenario("POST", base + "/api/trainings/", fixture.headers, body, frozenset({201})),
    }


def bare_scenarios(base: str, fixture: Fixture) -> dict[str, Scenario]:
    """The same operations on the bare server."""
    one = Scenario("GET", f"{base}/trainings/{fixture.training_id}?actor={fixture.actor}")
    page = Scenario("GET", f"{base}/trainings?actor={fixture.actor}")
    body = {"actor": fixture.actor, "model_id": fixture.model_id, "target_num_updates": 5}
    return {
        GET_ONE: one, GET_ONE_304: replace(one, expected=frozenset({304})),
        LIST: page, LIST_304: replace(page, expected=frozenset({304})),
        POST: Scenario("POST", base + "/trainings", body=body, expected=frozenset({201})),
    }


async def check(target: Target) -> None:
    """Send every scenario but the 304 kinds once; fail loudly on an unexpected answer."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for name, scenario in target.scenarios.items():
            if scenario.expected == {304}:
                continue
            async with session.request(scenario.method, scenario.url, headers=scenario.headers,
                                       json=scenario.body) as response:
                text = await response.text()
                if response.status not in scenario.expected:
                    raise RuntimeError(f"{target.name} {name}: {response.status}: {text[:300]}")
                if name == LIST and len(await response.json()) != 100:
                    raise RuntimeError(f"{target.name} {name}: not 100 items")


async def arm_conditionals(target: Target) -> None:
    """Give the 304 kinds the ETag of a first 200 and check they get 304 (after every write of `check`)."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for name, scenario in list(target.scenarios.items()):
            if scenario.expected != {304}:
                continue
            async with session.get(scenario.url, headers=scenario.headers) as response:
                text = await response.text()
                if response.status != 200 or "ETag" not in response.headers:
                    raise RuntimeError(f"{target.name} {name}: {response.status} without ETag: "
                                       f"{text[:300]}")
                tag = response.headers["ETag"]
            scenario = replace(scenario, headers={**scenario.headers, "If-None-Match": tag})
            target.scenarios[name] = scenario
            async with session.get(scenario.url, headers=scenario.headers) as response:
                if response.status != 304:
                    raise RuntimeError(f"{target.name} {name}: {response.status} to its own ETag")


def wait_healthy(url: str, timeout: float = 60) -> None:
    """Poll until a URL answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def bare_server(store_url: str) -> Iterator[tuple[str, int]]:
    """The bare server on the given store: its base URL and pid."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_server.py"),
                                "--url", store_url, "--port", str(port)])
    try:
        wait_healthy(f"http://127.0.0.1:{port}/trainings?actor={uuid.uuid4()}")
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait()


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    workers: tuple[int, ...]
    connections: tuple[int, ...]
    warmup: float
    seconds: float


async def measure(targets: list[Target], plan: Plan) -> list[Result]:
    """Every kind at every connection count on every target, interleaved."""
    results = []
    for name in KINDS:
        for connections in plan.connections:
            for target in targets:
                result = await drive(target, name, connections, plan.warmup, plan.seconds)
                results.append(result)
                server, store = (result.ms_per_request(cpu) for cpu in (result.server_cpu, result.store_cpu))
                print(f"  measured {target.name:<20} {name:<31} c={connections:<3} {result.rate:7.0f} req/s "
                      f"{server:5.2f} + {store:5.2f} CPU ms/req, {result.errors} errors, "
                      f"{result.opened} conns opened", flush=True)
    return results


async def run_http(plan: Plan) -> list[Result]:
    """Each service configuration on its own embedded store; the bare server beside the first one."""
    results: list[Result] = []
    for index, workers in enumerate(plan.workers):
        with tempfile.TemporaryDirectory() as data, ServiceProcess(Path(data), workers=workers) as service:
            assert service.process is not None
            sampler = Sampler(service.process.pid)
            fixture = await prepare_service(service.base_url)

            def service_ticks() -> tuple[int, int]:
                sample = sampler.read()
                return sample.service_ticks, sample.store_ticks

            targets = [Target(f"service {workers} worker{'s' if workers > 1 else ''}",
                              service_scenarios(service.base_url, fixture), service_ticks)]
            store = f"mongodb://127.0.0.1:{service.embedded_port}/?directConnection=true"
            with bare_server(store) if index == 0 else nullcontext() as bare:
                if bare is not None:
                    base, pid = bare
                    own = Sampler(pid)
                    targets.append(Target(BARE, bare_scenarios(base, fixture),
                                          lambda: (own.read().service_ticks, service_ticks()[1])))
                for target in targets:
                    await check(target)
                for target in targets:  # after every check's POST, which changes the list
                    await arm_conditionals(target)
                results += await measure(targets, plan)
    return results


# --- the store's insert rate --------------------------------------------------------------------


async def insert_rates(marks: tuple[int, ...], window: int = 200) -> list[tuple[int, float]]:
    """Insert valid trainings into a fresh embedded store; the rate of the `window` inserts to each mark."""
    rates = []
    with tempfile.TemporaryDirectory() as data, EmbeddedStore(Path(data)) as store:
        client = make_client(store.url)
        try:
            database = client["fltraining"]
            await init_database(database)
            actor = uuid.uuid4()
            started = 0.0
            for index in range(1, max(marks) + 1):
                if index in {mark - window + 1 for mark in marks}:
                    started = time.perf_counter()
                await database.trainings.insert_one(training_document(actor, uuid.uuid4(), 5))
                if index in marks:
                    rates.append((index, window / (time.perf_counter() - started)))
            stored = await database.trainings.count_documents({})
            if stored != max(marks):
                raise RuntimeError(f"inserted {max(marks)} trainings, the store holds {stored}")
        finally:
            await client.close()
    return rates


# --- report -------------------------------------------------------------------------------------


def bare_rates(results: list[Result]) -> dict[tuple[str, int], float]:
    """The bare server's req/s by (kind, connections)."""
    return {(r.scenario, r.connections): r.rate for r in results if r.target == BARE}


def print_table(results: list[Result]) -> None:
    """The benchmark table, with CPU per request and the service/bare ratio."""
    bare = bare_rates(results)
    print()
    print(f"| {'target':<20} | {'request':<31} | {'conns':>5} | {'req/s':>7} | {'p50 ms':>7} | "
          f"{'p99 ms':>7} | {'svc CPU ms/req':>14} | {'store CPU ms/req':>16} | {'client CPU ms/req':>17} | "
          f"{'errors':>6} | {'vs bare':>7} |")
    print(f"|{'-' * 22}|{'-' * 33}|{'-' * 6}:|{'-' * 8}:|{'-' * 8}:|{'-' * 8}:|{'-' * 15}:|{'-' * 17}:|"
          f"{'-' * 18}:|{'-' * 7}:|{'-' * 8}:|")
    for r in results:
        ratio = "" if r.target == BARE or not bare.get((r.scenario, r.connections)) else \
            f"{r.rate / bare[r.scenario, r.connections]:.2f}"
        p50, p99 = (f"{percentile(r.latencies, q):.1f}" if r.latencies else "-" for q in (0.5, 0.99))
        print(f"| {r.target:<20} | {r.scenario:<31} | {r.connections:>5} | {r.rate:>7.0f} | {p50:>7} | "
              f"{p99:>7} | {r.ms_per_request(r.server_cpu):>14.2f} | "
              f"{r.ms_per_request(r.store_cpu):>16.2f} | {r.ms_per_request(r.client_cpu):>17.2f} | "
              f"{r.errors:>6} | {ratio:>7} |")
    print("\nsvc CPU: the service's processes without the store (bare rows: the bare server's process); "
          "client: this benchmark's process. CPU from /proc over the measured window, warm-up excluded.")
    for r in results:
        if r.first_error:
            print(f"  first unexpected answer, {r.target}, {r.scenario}, c={r.connections}: {r.first_error}")
        if r.opened != r.connections:
            print(f"  {r.target}, {r.scenario}, c={r.connections}: {r.opened} connections opened")


def _find(results: list[Result], target: str, kind: str, connections: int) -> Result | None:
    matching = (r for r in results if (r.target, r.scenario, r.connections) == (target, kind, connections))
    return next(matching, None)


def print_targets(results: list[Result], connections: int) -> None:
    """The issue's targets, met or not, from the 1-worker service rows."""
    service = "service 1 worker"
    bare = bare_rates(results)
    rows: list[tuple[str, str, bool]] = []

    def cpu(kind: str, limit: float, note: str = "") -> None:
        if (r := _find(results, service, kind, connections)) is not None:
            value = r.ms_per_request(r.server_cpu)
            label = f"service CPU per request, {kind}, c={connections} ≤ {limit:g} ms{note}"
            rows.append((label, f"{value:.2f} ms", value <= limit))

    def rate(kind: str, limit: float) -> None:
        if (r := _find(results, service, kind, connections)) is not None:
            label = f"1 worker, embedded store: {kind}, c={connections} ≥ {limit:,.0f} req/s"
            rows.append((label, f"{r.rate:.0f} req/s", r.rate >= limit))

    cpu(GET_ONE, 0.5)
    cpu(POST, 1.5)
    cpu(LIST, 2.0)
    cpu(LIST_304, 0.3)
    cpu(GET_ONE_304, 0.3, " (not an issue target: the list's 304 bound, for comparison)")
    rate(LIST, 100)
    rate(POST, 150)
    rate(GET_ONE, 1000)
    for kind in KINDS:
        ratios = [(r.connections, r.rate / bare[kind, r.connections]) for r in results
                  if r.target == service and r.scenario == kind and bare.get((kind, r.connections))]
        if ratios:
            rows.append((f"service/bare ≥ 0.8, {kind}", ", ".join(f"c={c}: {x:.2f}" for c, x in ratios),
                         all(x >= 0.8 for _, x in ratios)))
    print()
    print("| target | measured | met |")
    print("|---|---:|---|")
    for label, value, met in rows:
        print(f"| {label} | {value} | {'met' if met else 'NOT MET'} |")


def print_dlr(results: list[Result], connections: int) -> None:
    """Ours beside DLR's figures at 32 connections: ours ÷ DLR's best."""
    print()
    print(f"| request, {connections} connections | DLR req/s | target | ours req/s | ours ÷ DLR best |")
    print("|---|---:|---|---:|---:|")
    for kind, (low, high) in DLR.items():
        for r in results:
            if r.scenario == kind and r.connections == connections and r.target != BARE:
                print(f"| {kind} | {low}–{high} | {r.target} | {r.rate:.0f} | {r.rate / high:.1f}× |")


async def main() -> None:
    """Run everything and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, help="measured time per measurement (default 5, --quick 1)")
    parser.add_argument("--warmup", type=float, help="warm-up per measurement (default 1, --quick 0.3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ~1 s measurements, a smaller fill")
    parser.add_argument("--workers", default="1", help="service worker counts, comma-separated (e.g. 1,2)")
    parser.add_argument("--skip-inserts", action="store_true", help="skip the store fill-rate measurement")
    args = parser.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    plan = Plan(workers, (1, 32), args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0),
                args.seconds if args.seconds is not None else (1.0 if args.quick else 5.0))
    print(f"{os.cpu_count()} CPUs; {plan.warmup:g} s warm-up + {plan.seconds:g} s per measurement; "
          f"service workers {', '.join(map(str, workers))}", flush=True)
    started = time.monotonic()
    results = await run_http(plan)
    print_table(results)
    print_targets(results, max(plan.connections))
    print_dlr(results, max(plan.connections))
    if not args.skip_inserts:
        rates = await insert_rates((500, 1000) if args.quick else (1000, 5000))
        print()
        print("| embedded store: trainings stored | inserts/s (last 200) |")
        print("|---:|---:|")
        for count, rate in rates:
            print(f"| {count:,} | {rate:.0f} |")
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
