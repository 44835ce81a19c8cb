"""HTTP benchmark of fltraining on the embedded store, against a bare aiohttp + PyMongo baseline.

Prints a table: requests/s, p50 and p99 latency at 1 and 32 connections, for the service with
1 and 2 workers and for the bare handler; then the embedded store's insert rate as it fills.
Usage: `python bench/api_bench.py [--seconds 5]` (or `make bench`).
"""

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fltraining.clock import utcnow
from fltraining.storage.database import init_database, make_client
from fltraining.storage.embedded import EmbeddedStore
from tests.processes import ServiceProcess, free_port

PASSWORD = "benchmark password"
Request = Callable[[aiohttp.ClientSession], Awaitable[int]]


@dataclass
class Result:
    """One measured scenario."""

    target: str
    scenario: str
    connections: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        """Latency percentile in milliseconds."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def drive(make_request: Request, connections: int, seconds: float) -> tuple[int, int, float, list[float]]:
    """Run `connections` loops of requests for `seconds`; count, errors, elapsed, latencies."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(connections, 4)):  # warm-up: open connections, fill caches
            await make_request(session)
        end = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                started = time.perf_counter()
                status = await make_request(session)
                latencies.append(time.perf_counter() - started)
                if status >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return len(latencies), errors, elapsed, latencies


async def _call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return response.status


async def prepare_service(base: str) -> dict[str, Any]:
    """A user, one model and 100 trainings (as the list scenario needs)."""
    async with aiohttp.ClientSession() as session:
        username = f"bench{uuid.uuid4().hex[:8]}"
        async with session.post(base + "/api/users/", json={"username": username, "password": PASSWORD}) as r:
            user = await r.json()
        headers = {"Authorization": f"Token {user['token']}"}
        form = aiohttp.FormData()
        form.add_field("name", "bench")
        form.add_field("model_file", b"\0" * 1024, filename="m.pt")
        async with session.post(base + "/api/models/", data=form, headers=headers) as r:
            model_id = (await r.json())["model_id"]
        training_ids = []
        for _ in range(100):
            body = {"model_id": model_id, "target_num_updates": 5, "options": {"daisy_chain_period": 2}}
            async with session.post(base + "/api/trainings/", json=body, headers=headers) as r:
                training_ids.append((await r.json())["training_id"])
    return {"headers": headers, "model_id": model_id, "training_id": training_ids[0], "actor": user["id"]}


def service_scenarios(base: str, fixture: dict[str, Any]) -> dict[str, Request]:
    """The three benchmarked service requests."""
    headers = fixture["headers"]
    one = f"{base}/api/trainings/{fixture['training_id']}/"
    body = {"model_id": fixture["model_id"], "target_num_updates": 5}
    return {
        "GET /api/trainings/{id}/": lambda s: _call(s, "GET", one, headers=headers),
        "GET /api/trainings/ (100)": lambda s: _call(s, "GET", base + "/api/trainings/", headers=headers),
        "POST /api/trainings/": lambda s: _call(s, "POST", base + "/api/trainings/", json=body, headers=headers),
    }


def bare_scenarios(base: str, fixture: dict[str, Any]) -> dict[str, Request]:
    """The same three operations on the bare handler."""
    one = f"{base}/trainings/{fixture['training_id']}"
    document = {"actor": fixture["actor"], "target_num_updates": 5}
    return {
        "GET /api/trainings/{id}/": lambda s: _call(s, "GET", one),
        "GET /api/trainings/ (100)": lambda s: _call(s, "GET", f"{base}/trainings?actor={fixture['actor']}"),
        "POST /api/trainings/": lambda s: _call(s, "POST", base + "/trainings", json=document),
    }


async def measure(target: str, scenarios: dict[str, Request], seconds: float) -> list[Result]:
    """Every scenario at 1 and 32 connections."""
    results = []
    for name, request in scenarios.items():
        for connections in (1, 32):
            count, errors, elapsed, latencies = await drive(request, connections, seconds)
            results.append(Result(target, name, connections, count, errors, elapsed, latencies))
            print(f"  measured {target:<18} {name:<26} c={connections:<3} {count / elapsed:8.0f} req/s", flush=True)
    return results


def wait_healthy(url: str, timeout: float = 60) -> None:
    """Poll until a URL answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def run_http(seconds: float) -> list[Result]:
    """Service with 1 and 2 workers, and the bare handler, on one embedded store each run."""
    results: list[Result] = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as data:
            with ServiceProcess(Path(data), workers=workers) as service:
                fixture = await prepare_service(service.base_url)
                results += await measure(f"service {workers} worker{'s' if workers > 1 else ''}",
                                         service_scenarios(service.base_url, fixture), seconds)
                if workers == 1:
                    port = free_port()
                    store = f"mongodb://127.0.0.1:{service.embedded_port}/?directConnection=true"
                    bare = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_server.py"),
                                             "--url", store, "--port", str(port)])
                    try:
                        wait_healthy(f"http://127.0.0.1:{port}/trainings?actor={fixture['actor']}")
                        results += await measure("bare aiohttp+PyMongo", bare_scenarios(f"http://127.0.0.1:{port}", fixture), seconds)
                    finally:
                        bare.terminate()
                        bare.wait()
    return results


async def insert_rates(marks: tuple[int, ...] = (1000, 5000), window: int = 200) -> list[tuple[int, float]]:
    """Insert training-shaped documents into a fresh embedded store; rate around each mark."""
    rates = []
    with tempfile.TemporaryDirectory() as data, EmbeddedStore(Path(data)) as store:
        client = make_client(store.url)
        database = client["fltraining"]
        await init_database(database)
        actor = uuid.uuid4()
        started = 0.0
        for index in range(1, max(marks) + 1):
            if index in {mark - window + 1 for mark in marks}:
                started = time.perf_counter()
            now = utcnow()
            await database.trainings.insert_one({
                "_id": uuid.uuid4(), "model": uuid.uuid4(), "actor": actor, "participants": [],
                "state": "I", "base_target_num_updates": 5, "target_num_updates": 5, "last_update": now,
                "created_at": now, "uncertainty_method": "NONE", "aggregation_method": "FedAvg",
                "options": {}, "metric_names": [], "locked": False, "state_detail": None, "version": 1,
            })
            if index in marks:
                rates.append((index, window / (time.perf_counter() - started)))
        await client.close()
    return rates


def print_table(results: list[Result]) -> None:
    """The benchmark table, with the service/bare ratio."""
    bare = {(r.scenario, r.connections): r.rate for r in results if r.target.startswith("bare")}
    print()
    print(f"| {'target':<20} | {'request':<26} | {'conns':>5} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6} | {'vs bare':>7} |")
    print(f"|{'-' * 22}|{'-' * 28}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 9}|")
    for r in results:
        ratio = r.rate / bare[(r.scenario, r.connections)] if (r.scenario, r.connections) in bare else 0.0
        print(f"| {r.target:<20} | {r.scenario:<26} | {r.connections:>5} | {r.rate:>7.0f} | "
              f"{r.percentile(0.5):>7.1f} | {r.percentile(0.99):>7.1f} | {r.errors:>6} | {ratio:>7.2f} |")


async def main() -> None:
    """Run everything and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--skip-inserts", action="store_true", help="skip the store fill-rate measurement")
    args = parser.parse_args()
    results = await run_http(args.seconds)
    print_table(results)
    if not args.skip_inserts:
        print()
        print("| embedded store: trainings stored | inserts/s (last 200) |")
        print("|---|---|")
        for count, rate in await insert_rates():
            print(f"| {count:,} | {rate:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
