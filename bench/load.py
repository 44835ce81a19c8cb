"""Load and abuse test of fltraining on a fresh embedded store, over loopback only.

Main phase: 64 connections of mixed reads and writes (a third writes) for --seconds, then a
table of throughput, p50/p99 latency per request kind, unexpected answers and transport errors
(the target is 0), and the peak RSS of the service process tree and of the store process.
Abuse phase (unless --no-abuse): a probe client measures GET /api/trainings/{id}/ alone, then
while other connections send 1 MiB+ JSON bodies, upload 50 MiB models concurrently and hold
200 slowloris connections (headers, JSON bodies and uploads trickled a byte at a time).
Usage: `python bench/load.py [--seconds 60] [--workers 1] [--abuse-seconds 20]`.
"""

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fltraining.weights import dump_tensors  # noqa: E402
from tests.processes import ServiceProcess

PASSWORD = "load test password"
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
STORE_MODULE = b"fltraining.storage.embedded"


# --- memory and CPU of the service's processes, from /proc -----------------------------------

def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    """A process and all its descendants."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU ticks of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int:
    """A process's CPU time in ns, every thread's (ended ones too), from its kernel CPU-time clock (0 once it is gone).

    /proc's figures step by 10 ms ticks: a round of ten clients is a dozen ticks, so per-round CPU read from them
    jumps by a twelfth; this clock (what `clock_getcpuclockid` gives for a pid) has no such steps.
    """
    try:
        return time.clock_gettime_ns((~pid << 3) | 2)  # the process-wide scheduler clock of `pid`
    except OSError:
        return 0


def service_and_store(root: int) -> tuple[list[int], list[int]]:
    """The service's processes (`root` and its descendants) other than the embedded store, and the store's."""
    pids = _tree(root, _children())
    store = [pid for pid in pids if _is_store(pid)]
    return [pid for pid in pids if pid not in store], store


def _is_store(pid: int) -> bool:
    """Whether a process is the embedded store."""
    try:
        return STORE_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Sample:
    """One reading of the service's processes."""

    at: float
    service_kib: int
    store_kib: int
    service_ticks: int
    store_ticks: int
    processes: int


class Sampler(threading.Thread):
    """Reads RSS and CPU of the service tree and of the store every 0.5 s, off the event loop."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def read(self) -> Sample:
        """Sample now."""
        service, store = service_and_store(self.root)
        return Sample(time.monotonic(), sum(map(_rss_kib, service)), sum(map(_rss_kib, store)),
                      sum(map(_cpu_ticks, service)), sum(map(_cpu_ticks, store)), len(service) + len(store))

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_event.is_set():
            self.samples.append(self.read())
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop_event.set()
        self.join()

    def window(self, start: float, end: float) -> list[Sample]:
        """Samples taken between two monotonic times."""
        return [s for s in self.samples if start <= s.at <= end] or [self.read()]


@dataclass
class Resources:
    """Peak memory and mean CPU of one phase."""

    service_peak_mib: float
    store_peak_mib: float
    service_start_mib: float
    store_start_mib: float
    service_cpu: float
    store_cpu: float
    processes: int

    @classmethod
    def of(cls, sampler: Sampler, start: float, end: float) -> "Resources":
        """Summarise the samples of [start, end]."""
        window = sampler.window(start, end)
        first, last = window[0], window[-1]
        seconds = max(last.at - first.at, 1e-9)
        return cls(
            max(s.service_kib for s in window) / 1024, max(s.store_kib for s in window) / 1024,
            first.service_kib / 1024, first.store_kib / 1024,
            (last.service_ticks - first.service_ticks) / CLK_TCK / seconds,
            (last.store_ticks - first.store_ticks) / CLK_TCK / seconds,
            max(s.processes for s in window),
        )


# --- request statistics ----------------------------------------------------------------------

def percentile(values: list[float], fraction: float) -> float:
    """A latency percentile in milliseconds (0 without values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Kind:
    """One kind of request in the mix and what it measured."""

    name: str
    weight: int
    write: bool
    expected: frozenset[int]
    latencies: list[float] = field(default_factory=list)
    unexpected: int = 0
    transport_errors: int = 0

    @property
    def errors(self) -> int:
        """Unexpected statuses plus transport errors."""
        return self.unexpected + self.transport_errors


@dataclass
class Failures:
    """The first few failures, to print after the table."""

    examples: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        """Keep up to ten examples."""
        if len(self.examples) < 10:
            self.examples.append(text[:300])


# --- fixture: users, models, trainings -------------------------------------------------------

@dataclass
class Actor:
    """An actor with its token, a model to create trainings from, and its trainings."""

    token: str
    model_id: str
    trainings: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        """Token authentication."""
        return {"Authorization": f"Token {self.token}"}


@dataclass
class World:
    """What the prepared store holds."""

    actors: list[Actor]
    clients: list[str]


async def _json(session: aiohttp.ClientSession, method: str, url: str, expected: int, **kwargs: Any) -> Any:
    """One setup request that must succeed."""
    async with session.request(method, url, **kwargs) as response:
        if response.status != expected:
            raise RuntimeError(f"setup {method} {url}: {response.status} {await response.text()}")
        return await response.json()


def safetensors_head(nbytes: int) -> bytes:
    """The header of a safetensors file holding one uint8 tensor of `nbytes` (the data follows it)."""
    small = dump_tensors({"w": np.zeros(1, np.uint8)})
    text = small[8 : 8 + int.from_bytes(small[:8], "little")].decode().replace("[1]", f"[{nbytes}]", 1)
    text = text.replace("[0,1]", f"[0,{nbytes}]", 1).rstrip()
    text += " " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text.encode()


def model_form(size: int = 4096) -> aiohttp.FormData:
    """A small model upload."""
    form = aiohttp.FormData()
    form.add_field("name", "load")
    form.add_field("description", "load test model")
    weights = np.frombuffer(os.urandom(size), np.uint8)  # a real model file: others are refused (400)
    form.add_field("model_file", dump_tensors({"w": weights}), filename="model.pt",
                   content_type="application/octet-stream")
    return form


async def register(session: aiohttp.ClientSession, base: str, prefix: str) -> dict[str, Any]:
    """A new user."""
    body = {"username": f"{prefix}{uuid.uuid4().hex[:10]}", "password": PASSWORD, "actor": True}
    return dict(await _json(session, "POST", base + "/api/users/", 201, json=body))


async def prepare(base: str, actors: int, clients: int, trainings_per_actor: int) -> World:
    """Users, one model per training (no clones at setup), trainings with two participants each."""
    async with aiohttp.ClientSession() as session:
        client_ids = [(await register(session, base, "client"))["id"] for _ in range(clients)]
        world = World([], client_ids)
        for _ in range(actors):
            user = await register(session, base, "actor")
            headers = {"Authorization": f"Token {user['token']}"}
            models, trainings = base + "/api/models/", base + "/api/trainings/"
            model = await _json(session, "POST", models, 201, data=model_form(), headers=headers)
            actor = Actor(user["token"], model["model_id"])
            for index in range(trainings_per_actor):
                own = await _json(session, "POST", models, 201, data=model_form(), headers=headers)
                body = {"model_id": own["model_id"], "target_num_updates": 10, "metric_names": ["accuracy"],
                        "clients": [client_ids[index % clients], client_ids[(index + 1) % clients]]}
                created = await _json(session, "POST", trainings, 201, json=body, headers=headers)
                actor.trainings.append(created["training_id"])
            world.actors.append(actor)
    return world


# --- main phase ------------------------------------------------------------------------------

Step = Callable[[aiohttp.ClientSession, random.Random], tuple[str, str, dict[str, Any]]]


def mix(base: str, world: World, connection: int) -> list[tuple[Kind, Step]]:
    """The request kinds of one connection: its actor's data, and a training of its own to write."""
    actor = world.actors[connection % len(world.actors)]
    own = actor.trainings[(connection // len(world.actors)) % len(actor.trainings)]
    auth = actor.headers
    clients = world.clients

    def get_training(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        return "GET", f"{base}/api/trainings/{r.choice(actor.trainings)}/", {"headers": auth}

    def patch(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        body = r.choice([{"target_num_updates": r.randint(1, 100)},
                         {"metric_names": ["accuracy", f"loss{r.randint(0, 9)}"]},
                         {"options": {"learning_rate": r.random()}}])
        return "PATCH", f"{base}/api/trainings/{own}/", {"headers": auth, "json": body}

    def put_clients(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        body = {"clients": r.sample(clients, 2)}
        return "PUT", f"{base}/api/trainings/{own}/clients/", {"headers": auth, "json": body}

    def delete_clients(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        body = {"clients": [r.choice(clients)]}
        return "DELETE", f"{base}/api/trainings/{own}/clients/", {"headers": auth, "json": body}

    def post_training(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        # The actor's model is in use, so each creation also clones it (the seed's rule).
        body = {"model_id": actor.model_id, "target_num_updates": r.randint(1, 50),
                "clients": [r.choice(clients)]}
        return "POST", f"{base}/api/trainings/", {"headers": auth, "json": body}

    def fixed(method: str, path: str) -> Step:
        return lambda s, r: (method, base + path, {"headers": auth})

    def upload(s: aiohttp.ClientSession, r: random.Random) -> tuple[str, str, dict[str, Any]]:
        return "POST", f"{base}/api/models/", {"headers": auth, "data": model_form()}

    ok, created = frozenset({200}), frozenset({201})
    return [
        (Kind("GET /api/trainings/{id}/", 30, False, ok), get_training),
        (Kind("GET /api/trainings/?limit=20", 10, False, ok), fixed("GET", "/api/trainings/?limit=20")),
        (Kind("GET /api/users/myself/", 10, False, ok), fixed("GET", "/api/users/myself/")),
        (Kind("GET /api/models/{id}/metadata/", 10, False, ok),
         fixed("GET", f"/api/models/{actor.model_id}/metadata/")),
        (Kind("GET /api/users/trainings/?limit=20", 5, False, ok),
         fixed("GET", "/api/users/trainings/?limit=20")),
        (Kind("PATCH /api/trainings/{id}/", 10, True, ok), patch),
        (Kind("PUT /api/trainings/{id}/clients/", 10, True, frozenset({202})), put_clients),
        (Kind("DELETE /api/trainings/{id}/clients/", 5, True, ok), delete_clients),
        (Kind("POST /api/trainings/ (clones)", 7, True, created), post_training),
        (Kind("POST /api/models/ (4 KiB)", 3, True, created), upload),
    ]


@dataclass
class Budget:
    """Stops every loop at a deadline or after a number of requests."""

    deadline: float
    remaining: int

    def take(self) -> bool:
        """Whether another request may start."""
        if time.monotonic() >= self.deadline or self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


async def timed(session: aiohttp.ClientSession, kind: Kind, method: str, url: str, failures: Failures,
                **kwargs: Any) -> None:
    """Send one request and record its latency and whether its answer was expected."""
    started = time.perf_counter()
    try:
        async with session.request(method, url, **kwargs) as response:
            body = await response.read()
            kind.latencies.append(time.perf_counter() - started)
            if response.status not in kind.expected:
                kind.unexpected += 1
                failures.add(f"{kind.name}: {response.status} {body[:200]!r}")
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        kind.transport_errors += 1
        failures.add(f"{kind.name}: {type(error).__name__} {error}")


async def main_phase(base: str, world: World, connections: int, seconds: float, max_requests: int,
                     failures: Failures) -> tuple[dict[str, Kind], float]:
    """Every connection loops over weighted random requests until the budget runs out."""
    kinds: dict[str, Kind] = {}
    budget = Budget(0.0, max_requests)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def loop(index: int) -> None:
            steps = mix(base, world, index)
            for kind, _ in steps:
                kinds.setdefault(kind.name, kind)
            shared = [(kinds[kind.name], step) for kind, step in steps]
            weights = [kind.weight for kind, _ in shared]
            rng = random.Random(index)
            while budget.take():
                kind, step = rng.choices(shared, weights)[0]
                method, url, kwargs = step(session, rng)
                await timed(session, kind, method, url, failures, **kwargs)

        budget.deadline = time.monotonic() + seconds
        started = time.perf_counter()
        await asyncio.gather(*(loop(index) for index in range(connections)))
        elapsed = time.perf_counter() - started
    return kinds, elapsed


# --- abuse phase -----------------------------------------------------------------------------

STAGES = ("probe alone", "+ slow clients", "+ 1 MiB+ JSON", "+ large uploads")


@dataclass
class Probe:
    """A normal client: sequential GET /api/trainings/{id}/ on one connection, by abuse stage."""

    stage: str = STAGES[0]
    latencies: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    errors: Counter[str] = field(default_factory=Counter)

    def during_abuse(self) -> list[float]:
        """Every latency measured while some abuser ran."""
        return [latency for stage in STAGES[1:] for latency in self.latencies[stage]]


async def run_probe(base: str, actor: Actor, probe: Probe, stop: asyncio.Event, failures: Failures) -> None:
    """Measure until stopped; each latency lands in the stage it started in."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        url = f"{base}/api/trainings/{actor.trainings[0]}/"
        while not stop.is_set():
            stage = probe.stage
            started = time.perf_counter()
            try:
                async with session.get(url, headers=actor.headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                ok = False
                failures.add(f"probe: {type(error).__name__} {error}")
            probe.latencies[stage].append(time.perf_counter() - started)
            probe.errors[stage] += not ok


@dataclass
class AbuseStats:
    """What the abusing connections saw."""

    big_json: Counter[str] = field(default_factory=Counter)
    uploads: Counter[str] = field(default_factory=Counter)
    upload_bytes: int = 0
    upload_seconds: float = 0.0
    slow: Counter[str] = field(default_factory=Counter)
    slow_opened: int = 0


async def big_json(base: str, actor: Actor, deadline: float, stats: AbuseStats, size: int) -> None:
    """POST JSON bodies over the limit, with Content-Length and chunked by turns; 413 is expected."""
    body = b'{"model_id": "' + b"a" * size + b'"}'

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    headers = {**actor.headers, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        chunked = False
        while time.monotonic() < deadline:
            data: Any = pieces() if chunked else body
            label = "chunked" if chunked else "Content-Length"
            try:
                async with session.post(base + "/api/trainings/", data=data, headers=headers) as response:
                    await response.read()
                    stats.big_json[f"{label}: {response.status}"] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                stats.big_json[f"{label}: {type(error).__name__}"] += 1
            chunked = not chunked


async def big_uploads(base: str, actor: Actor, deadline: float, stats: AbuseStats, size: int) -> None:
    """Upload large models streamed from a generator, deleting each; whatever runs at the deadline is cut."""
    block = os.urandom(MIB)
    # A safetensors header for one uint8 tensor of the whole size, then the bytes: a real model file.
    blocks = size // MIB
    head = safetensors_head(blocks * MIB)

    async def content() -> AsyncIterator[bytes]:
        yield head
        for _ in range(blocks):
            yield block
            stats.upload_bytes += len(block)

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                while True:
                    form = aiohttp.FormData()
                    form.add_field("name", "large")
                    form.add_field("model_file", content(), filename="large.pt",
                                   content_type="application/octet-stream")
                    try:
                        url = base + "/api/models/"
                        async with session.post(url, data=form, headers=actor.headers) as response:
                            answer = await response.json(content_type=None)
                            stats.uploads[f"upload: {response.status}"] += 1
                        if response.status == 201:
                            url = f"{base}/api/models/{answer['model_id']}/"
                            async with session.delete(url, headers=actor.headers) as response:
                                stats.uploads[f"delete: {response.status}"] += 1
                    except (aiohttp.ClientError, OSError) as error:
                        stats.uploads[f"upload: {type(error).__name__}"] += 1
        except TimeoutError:
            # The service must drop the partial file of an upload whose client went away.
            stats.uploads["upload: cut by the load script at the deadline"] += 1
    stats.upload_seconds += time.monotonic() - started


def slow_request(kind: str, port: int, token: str) -> tuple[bytes, bytes]:
    """The first bytes a slow client sends, and the byte it trickles after them."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    if kind == "headers":
        return f"GET /health HTTP/1.1\r\n{host}X-Slow: ".encode(), b"a"
    if kind == "json":
        head = (f"POST /api/users/ HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n")
        return head.encode() + b'{"username": ', b" "
    boundary = "loadboundary"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nslow\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n\r\n')
    head = (f"POST /api/models/ HTTP/1.1\r\n{host}Authorization: Token {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {10 * MIB}\r\n\r\n")
    return (head + preamble).encode(), b"\1"


async def slow_client(kind: str, port: int, token: str, deadline: float, interval: float,
                      stats: AbuseStats) -> None:
    """Hold a connection by trickling one byte per interval; reconnect when the service ends it."""
    first, drip = slow_request(kind, port, token)
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            await writer.drain()
        except (OSError, TimeoutError) as error:
            stats.slow[f"{kind}: connect {type(error).__name__}"] += 1
            await asyncio.sleep(interval)
            continue
        stats.slow_opened += 1
        outcome = "held to the end"
        try:
            while time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(min(interval, max(deadline - time.monotonic(), 0.01))):
                        answer = await reader.read(4096)
                except TimeoutError:
                    writer.write(drip)
                    await writer.drain()
                    continue
                outcome = f"answered {answer.split(b' ', 2)[1].decode()}" if answer else "closed by service"
                break
        except (ConnectionError, OSError):
            outcome = "reset by service"
        finally:
            writer.close()
        stats.slow[f"{kind}: {outcome}"] += 1


@dataclass
class AbuseResult:
    """The probe, the abusers and the resources of each stage."""

    probe: Probe
    stats: AbuseStats
    resources: dict[str, Resources]
    seconds: float


async def abuse_phase(base: str, port: int, world: World, sampler: Sampler, args: argparse.Namespace,
                      failures: Failures) -> AbuseResult:
    """Probe alone, then add slow clients, oversized JSON and large uploads a stage at a time."""
    actor = world.actors[0]
    probe, stats = Probe(), AbuseStats()
    stage_seconds = args.abuse_seconds / 3
    started = time.monotonic()
    deadline = started + args.probe_seconds + args.abuse_seconds
    kinds = ["headers"] * (args.slow_clients // 2) + ["json"] * (args.slow_clients * 7 // 20)
    kinds += ["upload"] * (args.slow_clients - len(kinds))
    uploaders = [world.actors[1 + i % (len(world.actors) - 1)] for i in range(args.uploaders)]
    starters: list[Callable[[], list[Awaitable[None]]]] = [
        lambda: [slow_client(kind, port, actor.token, deadline, args.slow_interval, stats) for kind in kinds],
        lambda: [big_json(base, actor, deadline, stats, MIB + 64 * 1024)
                 for _ in range(args.big_json_connections)],
        lambda: [big_uploads(base, uploader, deadline, stats, args.upload_mib * MIB)
                 for uploader in uploaders],
    ]
    stop = asyncio.Event()
    probing = asyncio.create_task(run_probe(base, actor, probe, stop, failures))
    resources: dict[str, Resources] = {}
    abusers: list[asyncio.Task[None]] = []
    stage_start = started
    for index, stage in enumerate(STAGES):
        probe.stage = stage
        if index:
            abusers += [asyncio.create_task(abuser) for abuser in starters[index - 1]()]
        await asyncio.sleep(args.probe_seconds if index == 0 else stage_seconds)  # the stage runs meanwhile
        resources[stage] = Resources.of(sampler, stage_start, time.monotonic())
        stage_start = time.monotonic()
    await asyncio.gather(*abusers)
    stop.set()
    await probing
    return AbuseResult(probe, stats, resources, time.monotonic() - started - args.probe_seconds)


# --- report ----------------------------------------------------------------------------------

def print_main(kinds: dict[str, Kind], elapsed: float, resources: Resources, connections: int,
               workers: int, client_cpu: float) -> None:
    """The main phase's table and summary."""
    every = [latency for kind in kinds.values() for latency in kind.latencies]
    total = sum(len(kind.latencies) + kind.transport_errors for kind in kinds.values())
    writes = sum(len(kind.latencies) + kind.transport_errors for kind in kinds.values() if kind.write)
    print(f"\nMain phase: {connections} connections, {elapsed:.1f} s, {workers} worker(s)\n")
    print(f"| {'request':<38} | {'count':>7} | {'share':>6} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'errors':>6} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for kind in kinds.values():
        count = len(kind.latencies) + kind.transport_errors
        print(f"| {kind.name:<38} | {count:>7} | {100 * count / max(total, 1):>5.1f}% | "
              f"{percentile(kind.latencies, 0.5):>7.1f} | {percentile(kind.latencies, 0.99):>7.1f} | "
              f"{kind.errors:>6} |")
    errors = sum(kind.errors for kind in kinds.values())
    print(f"| {'all':<38} | {total:>7} | {100.0:>5.1f}% | {percentile(every, 0.5):>7.1f} | "
          f"{percentile(every, 0.99):>7.1f} | {errors:>6} |")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| total requests | {total} |")
    print(f"| throughput | {total / elapsed:.0f} req/s |")
    print(f"| writes | {100 * writes / max(total, 1):.1f}% |")
    print(f"| unexpected statuses | {sum(k.unexpected for k in kinds.values())} |")
    print(f"| transport errors | {sum(k.transport_errors for k in kinds.values())} |")
    print(f"| service peak RSS ({resources.processes - 1} processes incl. workers) | "
          f"{resources.service_peak_mib:.0f} MiB (at start {resources.service_start_mib:.0f} MiB) |")
    print(f"| store peak RSS | {resources.store_peak_mib:.0f} MiB "
          f"(at start {resources.store_start_mib:.0f} MiB) |")
    print(f"| CPU: service / store / load client | {resources.service_cpu:.2f} / {resources.store_cpu:.2f} / "
          f"{client_cpu:.2f} cores |")


def print_abuse(result: AbuseResult, args: argparse.Namespace) -> bool:
    """The abuse phase's tables; whether the probe stayed responsive and every outcome was expected."""
    probe, stats = result.probe, result.stats
    print(f"\nAbuse phase: {result.seconds:.1f} s in three stages, each adding abusers to the previous\n")
    print(f"| {'stage':<17} | {'probe GETs':>10} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | "
          f"{'errors':>6} | {'service RSS':>11} | {'store RSS':>9} | {'CPU svc/store':>13} |")
    print(f"|{'-' * 19}|{'-' * 12}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 13}|{'-' * 11}|{'-' * 15}|")
    for stage in STAGES:
        values, used = probe.latencies[stage], result.resources[stage]
        print(f"| {stage:<17} | {len(values):>10} | {percentile(values, 0.5):>7.1f} | "
              f"{percentile(values, 0.99):>7.1f} | {percentile(values, 1.0):>7.1f} | "
              f"{probe.errors[stage]:>6} | "
              f"{used.service_peak_mib:>7.0f} MiB | {used.store_peak_mib:>5.0f} MiB | "
              f"{used.service_cpu:>5.2f} / {used.store_cpu:>4.2f} |")
    during = probe.during_abuse()
    errors = sum(probe.errors[stage] for stage in STAGES[1:])
    service_peak = max(used.service_peak_mib for used in result.resources.values())
    store_peak = max(used.store_peak_mib for used in result.resources.values())
    print(f"| {'all abuse':<17} | {len(during):>10} | {percentile(during, 0.5):>7.1f} | "
          f"{percentile(during, 0.99):>7.1f} | {percentile(during, 1.0):>7.1f} | {errors:>6} | "
          f"{service_peak:>7.0f} MiB | {store_peak:>5.0f} MiB | {'':>13} |")
    responsive = errors == 0 and bool(during) and max(during) < args.responsive_ms / 1000
    print("\nresponsive (every probe GET answered 200 during abuse, none slower than "
          f"{args.responsive_ms:.0f} ms): {'yes' if responsive else 'NO'}\n")
    unexpected = 0
    print("| abuser | outcome | count |")
    print("|---|---|---|")
    for outcome, count in sorted(stats.big_json.items()):
        unexpected += count * (not outcome.endswith(": 413"))
        print(f"| {args.big_json_connections} conns POSTing 1 MiB + 64 KiB JSON | {outcome} | {count} |")
    expected_uploads = ("upload: 201", "delete: 200", "upload: cut by the load script at the deadline")
    for outcome, count in sorted(stats.uploads.items()):
        unexpected += count * (outcome not in expected_uploads)
        print(f"| {args.uploaders} conns uploading {args.upload_mib} MiB models | {outcome} | {count} |")
    if stats.upload_seconds:
        rate = stats.upload_bytes / MIB / stats.upload_seconds * args.uploaders
        print(f"| {args.uploaders} conns uploading {args.upload_mib} MiB models | bytes sent | "
              f"{stats.upload_bytes / MIB:.0f} MiB ({rate:.1f} MiB/s in all) |")
    expected_slow = ("held to the end", "answered 408", "closed by service")
    for outcome, count in sorted(stats.slow.items()):
        unexpected += count * (not outcome.endswith(expected_slow))
        print(f"| {args.slow_clients} slow clients, a byte / {args.slow_interval:g} s | {outcome} | "
              f"{count} |")
    print(f"| {args.slow_clients} slow clients | connections opened | {stats.slow_opened} |")
    print(f"\nunexpected abuse outcomes: {unexpected}")
    return responsive and unexpected == 0


async def run(args: argparse.Namespace) -> int:
    """Start the service, prepare, run the phases, print the tables; exit status 1 on errors."""
    env = dict(item.split("=", 1) for item in args.set)
    with (tempfile.TemporaryDirectory() as data,
          ServiceProcess(Path(data), workers=args.workers, env=env) as service):
        assert service.process is not None
        sampler = Sampler(service.process.pid)
        sampler.start()
        try:
            world = await prepare(service.base_url, actors=4, clients=8, trainings_per_actor=16)
            print(f"prepared 4 actors, 8 clients, 64 trainings; running {args.seconds:.0f} s "
                  f"at {args.connections} connections", flush=True)
            failures = Failures()
            cpu_started, started = time.process_time(), time.monotonic()
            kinds, elapsed = await main_phase(service.base_url, world, args.connections, args.seconds,
                                              args.max_requests, failures)
            resources = Resources.of(sampler, started, time.monotonic())
            client_cpu = (time.process_time() - cpu_started) / elapsed
            print_main(kinds, elapsed, resources, args.connections, args.workers, client_cpu)
            failed = sum(kind.errors for kind in kinds.values()) > 0
            if args.abuse:
                print(f"\nabuse phase: probe alone {args.probe_seconds:g} s, then {args.abuse_seconds:g} s "
                      "of abuse", flush=True)
                result = await abuse_phase(service.base_url, service.port, world, sampler, args, failures)
                failed |= not print_abuse(result, args)
        finally:
            sampler.stop()
        logged = [line for line in service.log().splitlines() if " ERROR " in line or "Traceback" in line]
        print(f"\nservice log: {len(logged)} error lines")
        for line in logged[:5]:
            print("  " + line[:300])
        if failures.examples:
            print("first failures:")
            for example in failures.examples:
                print("  " + example)
    return 1 if failed else 0


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="main phase duration")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument("--connections", type=int, default=64,
                        help="concurrent connections of the main phase")
    parser.add_argument("--max-requests", type=int, default=2_000_000,
                        help="stop the main phase after this many")
    parser.add_argument("--no-abuse", dest="abuse", action="store_false", help="skip the abuse phase")
    parser.add_argument("--abuse-seconds", type=float, default=20.0, help="abuse phase duration")
    parser.add_argument("--probe-seconds", type=float, default=5.0, help="probe alone before the abuse")
    parser.add_argument("--slow-clients", type=int, default=200,
                        help="slowloris connections held during abuse")
    parser.add_argument("--slow-interval", type=float, default=2.0,
                        help="seconds between a slow client's bytes")
    parser.add_argument("--uploaders", type=int, default=4, help="concurrent large uploads during abuse")
    parser.add_argument("--upload-mib", type=int, default=50, help="size of each large upload")
    parser.add_argument("--big-json-connections", type=int, default=4, help="connections sending 1 MiB+ JSON")
    parser.add_argument("--responsive-ms", type=float, default=1000.0,
                        help="slowest probe answer during abuse that still counts as responsive")
    parser.add_argument("--set", action="append", default=[], metavar="FLTRAINING_NAME=VALUE",
                        help="service setting for this run (repeatable)")
    args = parser.parse_args()
    if any(not item.startswith("FLTRAINING_") or "=" not in item for item in args.set):
        parser.error("--set takes FLTRAINING_NAME=VALUE")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
