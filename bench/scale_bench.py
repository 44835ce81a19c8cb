"""The round engine at scale: N simulated DLR-style clients per round against `fltraining serve`.

The service runs as `make run` starts it (`fltraining serve`, one process, the embedded store unless
`--mongodb-url`), with two bench-only settings: loopback message endpoints, and a count of the store
commands it sends (`FLTRAINING_STORE_COMMAND_COUNTS_FILE`, written on SIGUSR1). The clients live in
this process: one aiohttp server with a notification path per client. A FedAvg training with
`skip_model_tests` on a 10,000-parameter safetensors model; when told (`UPDATE_ROUND_START`), each
client downloads the global model, adds its delta and uploads it.

Per N it prints: the upload phase (first round notification → last upload answered), last upload →
first / last client notified of the next round, service and store CPU per client per round (the kernel's
CPU-time clocks of the processes), store commands per client per round, and the growth of CPU per client from
round 2 to the last of one training (read off the least-squares line through rounds 2 … last).

Whether late rounds cost what early ones do is measured side by side (`--pairs` per N below 1,000 clients):
this machine slows by a fifth or more for seconds or minutes at a time, so one training's round 20 and round 2,
a minute apart, can differ by a fifth for that alone. A pair is two trainings of N clients run at once, each
with its own service and store, the late one started `--lead` (20) rounds earlier: the CPU per client per
round of its rounds during the early one's rounds 2 … span + 1 (span: `--rounds`, and at least 1,000
client-rounds) over the early one's, both over the same seconds.

Every upload must answer 201 and every round must aggregate every client: a run with any error says so and
exits non-zero.

Each N runs three trainings (`--repeat`, `--repeat-large`), each with its own service, and prints the
run with the median CPU, with the ranges of CPU, of the time to the last notification and of the growth over
the runs.

Usage: `python bench/scale_bench.py [--clients 10,100,300,1000] [--rounds 20] [--rounds-large 3]
[--repeat 3] [--repeat-large 3] [--pairs 2] [--lead 20] [--mongodb-url URL]` (`make bench-scale`).
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load import _json, cpu_ns, service_and_store  # noqa: E402  (bench/ is on sys.path as the script's folder)

from fltraining.weights import dump_tensors, load_tensors  # noqa: E402
from tests.processes import ServiceProcess, free_port  # noqa: E402

PASSWORD = "scale bench password"
PARAMETERS = 10_000
LARGE = 1000  # from this many clients on, --rounds-large rounds
CLIENT_CONNECTIONS = 128
PAIR_CLIENT_ROUNDS = 1000  # the early training of a pair runs at least this many client-rounds (N = 10: 100 rounds)
SPARE_ROUNDS = 10  # the late training of a pair runs this many more rounds, so that it outlasts the early one
ROUND_TIMEOUT_SECONDS = 900.0


@dataclass
class RoundTimes:
    """When each client was told to train in a round, and when its upload was answered."""

    notified: dict[int, float] = field(default_factory=dict)
    uploaded: dict[int, float] = field(default_factory=dict)


@dataclass
class Clients:
    """N simulated clients behind one notification server."""

    base: str
    tokens: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    rounds: defaultdict[int, RoundTimes] = field(default_factory=lambda: defaultdict(RoundTimes))
    finished: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def notified(self, request: web.Request) -> web.Response:
        """A notification for client `index`: train now, or note the end."""
        index = int(request.match_info["index"])
        message = await request.json()
        kind, body = message["notification_type"], message["body"]
        now = time.monotonic()
        if kind == "UPDATE_ROUND_START":
            self.rounds[body["round"]].notified.setdefault(index, now)
            task = asyncio.create_task(self.train(index, body["round"], body["global_model_uuid"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif kind == "TRAINING_FINISHED":
            self.finished.setdefault(index, now)
        self.changed.set()
        return web.Response(status=202)

    async def train(self, index: int, round_: int, model_id: str) -> None:
        """Download the global model, add this client's delta, upload it."""
        assert self.session is not None
        headers = {"Authorization": f"Token {self.tokens[index]}"}
        try:
            async with self.session.get(f"{self.base}/api/models/{model_id}/", headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"download {response.status}")
                tensors = load_tensors(await response.read())
            trained = {name: np.asarray(value) + np.float32(index % 7) for name, value in tensors.items()}
            form = aiohttp.FormData()
            form.add_field("round", str(round_))
            form.add_field("sample_size", "1")
            form.add_field("model_file", dump_tensors(trained), filename="model_file")
            async with self.session.post(f"{self.base}/api/models/{model_id}/", data=form, headers=headers) as response:
                if response.status != 201:
                    raise RuntimeError(f"upload {response.status} {await response.text()}")
            self.rounds[round_].uploaded[index] = time.monotonic()
        except Exception as error:  # counted and printed: a bench with errors is no measurement
            self.errors.append(f"client {index} round {round_}: {type(error).__name__}: {error}")
        self.changed.set()


@dataclass
class Boundary:
    """CPU time (ns) and store commands when every client had been told about a round."""

    at: float
    service_ns: int
    store_ns: int
    commands: Counter[str]


def cpu_split(root: int) -> tuple[int, int]:
    """CPU time (ns) of the service's processes and of the embedded store among them."""
    service, store = service_and_store(root)
    return sum(map(cpu_ns, service)), sum(map(cpu_ns, store))


def read_commands(stem: Path, pid: int) -> Counter[str]:
    """Ask the service for its store command counts (SIGUSR1) and read them once written."""
    target = stem.with_name(f"{stem.name}.{pid}.json")
    target.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not target.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the service wrote no command counts")
        time.sleep(0.01)
    return Counter(json.loads(target.read_text()))


async def wait_for(clients: Clients, done: Any, what: str) -> None:
    """Wait until `done()` holds (each client notification or upload wakes the check)."""
    async with asyncio.timeout(ROUND_TIMEOUT_SECONDS):
        while not done():
            if clients.errors:
                raise RuntimeError(f"{what}: {clients.errors[:5]}")
            clients.changed.clear()
            await clients.changed.wait()


async def setup(service: ServiceProcess, clients: Clients, n: int, rounds: int, notify_base: str) -> None:
    """N client users, an actor, the model and the started training."""
    assert clients.session is not None
    session, base = clients.session, service.base_url
    semaphore = asyncio.Semaphore(8)

    async def register(index: int) -> dict[str, Any]:
        body = {"username": f"client{index}", "password": PASSWORD, "client": True,
                "message_endpoint": f"{notify_base}/c/{index}"}
        async with semaphore:
            return dict(await _json(session, "POST", base + "/api/users/", 201, json=body))

    users = await asyncio.gather(*(register(index) for index in range(n)))
    clients.tokens = [user["token"] for user in users]
    clients.ids = [user["id"] for user in users]
    actor = await _json(session, "POST", base + "/api/users/", 201,
                        json={"username": "actor", "password": PASSWORD, "actor": True})
    headers = {"Authorization": f"Token {actor['token']}"}
    form = aiohttp.FormData()
    form.add_field("name", "scale")
    weights = {"w": np.zeros((100, 99), np.float32), "b": np.zeros(100, np.float32)}  # 10,000 parameters
    form.add_field("model_file", dump_tensors(weights), filename="model.safetensors")
    model = await _json(session, "POST", base + "/api/models/", 201, data=form, headers=headers)
    body = {"model_id": model["model_id"], "target_num_updates": rounds, "clients": clients.ids,
            "aggregation_method": "FedAvg", "uncertainty_method": "NONE", "metric_names": [],
            "options": {"skip_model_tests": True}}
    created = await _json(session, "POST", base + "/api/trainings/", 201, json=body, headers=headers)
    await _json(session, "POST", f"{base}/api/trainings/{created['training_id']}/start/", 202, headers=headers)


@dataclass
class Pair:
    """CPU per client per round of a training's late rounds and of another training's early rounds, run side by
    side by two services at the same time (so a slower spell of the machine slows both)."""

    late_rounds: tuple[int, int]
    early_rounds: tuple[int, int]
    late_ms: float
    early_ms: float

    @property
    def ratio(self) -> float:
        """Late over early."""
        return self.late_ms / self.early_ms


@dataclass
class Row:
    """The figures of one N."""

    n: int
    rounds: int
    upload_phase: float
    first_notified: float
    last_notified: float
    service_ms: float
    store_ms: float
    commands: float
    growth: float
    top_commands: str
    runs: int = 1
    cpu_range: tuple[float, float] = (0.0, 0.0)  # service + store per client, lowest and highest run
    notified_range: tuple[float, float] = (0.0, 0.0)  # last upload → last client notified, over the runs
    growth_range: tuple[float, float] = (1.0, 1.0)  # CPU growth, lowest and highest run
    pairs: list[Pair] = field(default_factory=list)

    @property
    def cpu_ms(self) -> float:
        """Service and store CPU per client per round."""
        return self.service_ms + self.store_ms


def median_run(rows: list[Row]) -> Row:
    """The run whose CPU per client is the median of the runs (all its figures from that run), with their range."""
    ranked = sorted(rows, key=lambda row: row.cpu_ms)
    middle = ranked[(len(ranked) - 1) // 2]
    notified = [row.last_notified for row in rows]
    growths = [row.growth for row in rows]
    return replace(middle, runs=len(rows), cpu_range=(ranked[0].cpu_ms, ranked[-1].cpu_ms),
                   notified_range=(min(notified), max(notified)), growth_range=(min(growths), max(growths)))


@dataclass
class Run:
    """One training as the bench saw it: when each round began for every client, and the CPU and commands then."""

    n: int
    rounds: int
    clients: Clients
    boundaries: list[Boundary]

    def cpu_ns(self, index: int) -> int:
        """Service and store CPU at boundary `index`."""
        return self.boundaries[index].service_ns + self.boundaries[index].store_ns


async def run_training(n: int, rounds: int, mongodb_url: str | None, ahead: tuple[int, asyncio.Event] | None = None,
                       ) -> Run:
    """Run one training of `rounds` rounds with `n` clients, its own service and store; `ahead` is set once the
    given number of rounds began."""
    with tempfile.TemporaryDirectory(prefix="fltraining-scale-") as temp:
        stem = Path(temp) / "commands"
        env = {"FLTRAINING_NOTIFICATION_ALLOW_LOOPBACK": "true", "FLTRAINING_STORE_COMMAND_COUNTS_FILE": str(stem)}
        if mongodb_url:
            env |= {"FLTRAINING_MONGODB_URL": mongodb_url, "FLTRAINING_DATABASE": f"scale{n}_{uuid.uuid4().hex[:12]}"}
        service = ServiceProcess(Path(temp) / "data", env=env)
        service.start()
        port = free_port()
        clients = Clients(service.base_url)
        app = web.Application()
        app.router.add_post("/c/{index}", clients.notified)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS)
        clients.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        try:
            assert service.process is not None
            pid = service.process.pid
            await setup(service, clients, n, rounds, f"http://127.0.0.1:{port}")
            boundaries: list[Boundary] = []
            for round_ in range(rounds + 1):
                if round_ < rounds:
                    await wait_for(clients, lambda r=round_: len(clients.rounds[r].notified) == n, f"round {round_}")
                else:
                    await wait_for(clients, lambda: len(clients.finished) == n, "the end")
                at = time.monotonic()
                service_ns, store_ns = cpu_split(pid)
                commands = await asyncio.to_thread(read_commands, stem, pid)
                boundaries.append(Boundary(at, service_ns, store_ns, commands))
                if ahead is not None and len(boundaries) == ahead[0]:
                    ahead[1].set()
            if clients.errors:
                raise RuntimeError(f"client errors: {clients.errors[:5]}")
            for round_ in range(rounds):
                if len(clients.rounds[round_].uploaded) != n:
                    raise RuntimeError(f"round {round_}: {len(clients.rounds[round_].uploaded)} of {n} uploads")
        finally:
            await clients.session.close()
            await runner.cleanup()
            service.stop()
        return Run(n, rounds, clients, boundaries)


def figures(run: Run) -> Row:
    """A training's figures (times and commands: medians over rounds 2 … last; CPU: their mean)."""
    n, rounds, clients, boundaries = run.n, run.rounds, run.clients, run.boundaries

    def per_client_ms(times: list[int]) -> list[float]:
        return [(b - a) / 1e6 / n for a, b in pairwise(times)]

    service_ms = per_client_ms([b.service_ns for b in boundaries])
    store_ms = per_client_ms([b.store_ns for b in boundaries])
    per_round_commands = [b.commands - a.commands for a, b in pairwise(boundaries)]
    commands = [sum(c.values()) / n for c in per_round_commands]
    upload_phase, first_notified, last_notified = [], [], []
    for round_ in range(rounds):
        times = clients.rounds[round_]
        last_upload = max(times.uploaded.values())
        upload_phase.append(last_upload - min(times.notified.values()))
        following = clients.rounds[round_ + 1].notified if round_ + 1 < rounds else clients.finished
        first_notified.append(min(following.values()) - last_upload)
        last_notified.append(max(following.values()) - last_upload)
    totals = [s + t for s, t in zip(service_ms, store_ms)]
    later = slice(1, None) if rounds > 1 else slice(None)  # round 1 includes the service's warm-up
    # CPU as the mean over rounds 2 … last: a round's cost is what the service does for it, whichever
    # round's boundary a clean-up happens to straddle.
    first = 1 if rounds > 1 else 0
    counted = len(boundaries) - 1 - first

    def mean_ms(times: list[int]) -> float:
        return (times[-1] - times[first]) / 1e6 / n / counted
    top = sum(per_round_commands[later], Counter())
    return Row(
        n=n, rounds=rounds, upload_phase=statistics.median(upload_phase[later]),
        first_notified=statistics.median(first_notified[later]), last_notified=statistics.median(last_notified[later]),
        service_ms=mean_ms([b.service_ns for b in boundaries]), store_ms=mean_ms([b.store_ns for b in boundaries]),
        commands=statistics.median(commands[later]), growth=growth(totals),
        top_commands=", ".join(f"{name} {count / n / len(per_round_commands[later]):.2f}"
                               for name, count in top.most_common(8)),
    )


async def measure(n: int, rounds: int, mongodb_url: str | None) -> Row:
    """Run one training of `rounds` rounds with `n` clients; return the figures."""
    return figures(await run_training(n, rounds, mongodb_url))


async def side_by_side(n: int, lead: int, span: int, mongodb_url: str | None) -> Pair:
    """Two trainings of `n` clients at once, each with its own service: the late one started `lead` rounds before
    the early one; the CPU per client of the late one's rounds over that of the early one's rounds 2 … span + 1,
    measured over the same seconds."""
    ahead = asyncio.Event()
    late_task = asyncio.create_task(run_training(n, lead + span + SPARE_ROUNDS, mongodb_url, (lead + 1, ahead)))
    waiting = asyncio.create_task(ahead.wait())
    await asyncio.wait([late_task, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not ahead.is_set():
        waiting.cancel()
        await late_task  # raises what stopped it
        raise RuntimeError("the late training ended before it was ahead")
    early = await run_training(n, span + 2, mongodb_url)
    late = await late_task
    start, end = early.boundaries[1].at, early.boundaries[span + 1].at
    inside = [index for index, boundary in enumerate(late.boundaries[:-1]) if start <= boundary.at <= end]
    if len(inside) < 2 or inside[-1] - inside[0] < span // 2:
        raise RuntimeError(f"the late training ran {len(inside)} rounds beside the early one's {span}")
    first, last = inside[0], inside[-1]
    return Pair(late_rounds=(first + 1, last), early_rounds=(2, span + 1),
                late_ms=(late.cpu_ns(last) - late.cpu_ns(first)) / 1e6 / n / (last - first),
                early_ms=(early.cpu_ns(span + 1) - early.cpu_ns(1)) / 1e6 / n / span)


def growth(totals: list[float]) -> float:
    """CPU per client of the last round over that of round 2, both read off the least-squares line through rounds
    2 … last of one training. Only a rough figure: this machine slows by a fifth or more for seconds or minutes
    at a time, and a slow spell near either end tilts the line as much; `side_by_side` compares late and early
    rounds in the same seconds."""
    later = totals[1:] if len(totals) > 1 else totals
    if len(later) < 2:
        return 1.0
    slope, intercept = np.polyfit(np.arange(len(later), dtype=float), np.asarray(later), 1)
    first, last = intercept, intercept + slope * (len(later) - 1)
    return float(last / first) if first > 0 else 1.0


def print_table(rows: list[Row], mongodb_url: str | None) -> None:
    """The figures, one row per N (medians over rounds 2 … last)."""
    store = "MongoDB at " + mongodb_url if mongodb_url else "the embedded store"
    print(f"\nRound engine at scale on {store} ({os.cpu_count()} cores); rounds 2 … last: medians of the times "
          "and of the commands, the mean of the CPU")
    print("Runs: the trainings run per N; the row is the run with the median CPU, the range that of all runs.")
    print("Late / early: CPU per client per round of one training's rounds after round --lead next to another "
          "training's rounds 2 …, run at the same time (pairs: --pairs).")
    print("| clients | rounds | runs | upload phase | last upload → first / last notified (range) | service + store CPU "
          "per client per round (range) | store commands per client per round | CPU growth, round 2 → last (one "
          "training, fit; range) | late / early rounds side by side (range) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        spread = f" ({row.cpu_range[0]:.1f}–{row.cpu_range[1]:.1f})" if row.runs > 1 else ""
        notified = f" ({row.notified_range[0]:.2f}–{row.notified_range[1]:.2f})" if row.runs > 1 else ""
        grown = f" ({row.growth_range[0]:.2f}–{row.growth_range[1]:.2f})" if row.runs > 1 else ""
        ratios = sorted(pair.ratio for pair in row.pairs)
        paired = "–" if not ratios else f"{statistics.median(ratios):.2f}×" + (
            f" ({ratios[0]:.2f}–{ratios[-1]:.2f})" if len(ratios) > 1 else "")
        print(f"| {row.n:,} | {row.rounds} | {row.runs} | {row.upload_phase:.2f} s | {row.first_notified:.2f} / "
              f"{row.last_notified:.2f} s{notified} | {row.service_ms:.1f} + {row.store_ms:.1f} ms{spread} | "
              f"{row.commands:.2f} | {row.growth:.2f}×{grown} | {paired} |")
    print("\nLate / early rounds side by side:")
    for row in rows:
        for pair in row.pairs:
            print(f"  N = {row.n:,}: rounds {pair.late_rounds[0]}–{pair.late_rounds[1]} {pair.late_ms:.2f} ms, "
                  f"rounds {pair.early_rounds[0]}–{pair.early_rounds[1]} {pair.early_ms:.2f} ms: {pair.ratio:.3f}×")
    print("\nStore commands per client per round, by kind (rounds 2 … last):")
    for row in rows:
        print(f"  N = {row.n:,}: {row.top_commands}")


def main() -> None:
    """Parse the arguments, run each N, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,300,1000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per training below 1,000 clients")
    parser.add_argument("--rounds-large", type=int, default=3, help="rounds per training from 1,000 clients on")
    parser.add_argument("--repeat", type=int, default=3, help="trainings per N below 1,000 clients")
    parser.add_argument("--repeat-large", type=int, default=3, help="trainings per N from 1,000 clients on")
    parser.add_argument("--pairs", type=int, default=2, help="late / early pairs per N below 1,000 clients")
    parser.add_argument("--lead", type=int, default=20, help="rounds the late training of a pair is ahead")
    parser.add_argument("--mongodb-url", default=None, help="run on this MongoDB instead of the embedded store")
    args = parser.parse_args()
    rows = []
    for n in (int(value) for value in args.clients.split(",")):
        large = n >= LARGE
        rounds, repeat = (args.rounds_large, args.repeat_large) if large else (args.rounds, args.repeat)
        started = time.monotonic()
        # Separate trainings, each with its own service: this machine's speed drifts by a fifth between runs.
        row = median_run([asyncio.run(measure(n, rounds, args.mongodb_url)) for _ in range(repeat)])
        if not large:
            span = max(args.rounds, PAIR_CLIENT_ROUNDS // n)
            row.pairs = [asyncio.run(side_by_side(n, args.lead, span, args.mongodb_url)) for _ in range(args.pairs)]
        rows.append(row)
        print(f"N = {n:,}: {repeat} × {rounds} rounds and {0 if large else args.pairs} pairs in "
              f"{time.monotonic() - started:.0f} s", flush=True)
    print_table(rows, args.mongodb_url)


if __name__ == "__main__":
    main()
