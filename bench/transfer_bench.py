"""Model transfer benchmark: safetensors uploads and downloads, the service against a bare aiohttp handler.

The bare handler does the least the same request needs and is the baseline.

For every size (default 4 MB, 100 MB and 1 GB, 10⁶ bytes per MB) a safetensors file holding one
float32 tensor `w` is written once to a temporary directory with `write_tensors` (a random row
repeated, so no array of the file's size is ever built) and read back into the page cache before
it is sent, so the client reads memory, not the disk. Three targets, each a fresh subprocess on a
fresh temporary directory:

- bare: this script re-invoked with `--bare-server PORT DIR`, an aiohttp app whose POST handler
  reads the multipart request with `request.multipart()`, streams the `model_file` part in
  256 KiB chunks into a file while computing its sha256, fsyncs it and answers 201; its GET
  handler answers `web.FileResponse` (sendfile).
- service, blob store `files` (the embedded default) and `gridfs`: `python -m routes.cli serve` on
  the embedded store (no MongoDB URL), `POST /api/models/` and `GET /api/models/{id}/` as a
  registered user.

The client is the same for all: the upload is multipart `name`, `description` and `model_file`
streamed from the open file by aiohttp's `FormData`; the download is hashed chunk by chunk
(`iter_chunked(1 MiB)`) and its sha256 compared with the uploaded file's. Each time runs from the
request to the end of the response body; the best of `--repeat` runs is kept (default 10 below
10 MB, 3 below 1 GB, 1 from 1 GB), MB/s counts the file's bytes. The service's ratio is its MB/s over the bare
handler's for the same size and direction, and is not given when the baseline failed.

While a size's transfers run, a thread samples `/proc/<pid>/status` (VmRSS and RssAnon) of the
server process and its descendants every 20 ms (for the service: the HTTP process and its
embedded store child); the growth shown is the peak during the size's transfers minus the value
right before them, per process and summed (VmRSS counts mapped file pages, RssAnon does not).
Targets, for the service with blob store `files`: upload and download ≥ 0.5 × the bare handler
at every size, summed peak VmRSS growth < 256 MiB at 1 GB, every file intact. The `gridfs` lines
are informational. Errors (non-2xx answers, sha256 mismatches, a server that does not start) are
listed under the table and make the exit status 1.
Usage: `python bench/transfer_bench.py [--quick | --sizes 4M,100M,1G] [--repeat N]`
(or `make bench-transfer ARGS=...`).
"""

import argparse
import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import aiohttp
import numpy as np
from aiohttp import BodyPartReader, FormData, web

from fltraining.weights.formats import write_tensors

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"
USERNAME = "bench"
FLOAT32_BYTES = 4
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MB = 10**6
SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9}
DEFAULT_SIZES = "4M,100M,1G"
QUICK_SIZES = "4M,100M"
LARGE_SIZE = 10**9  # from here on one repetition by default
SMALL_REPEAT = 3
TINY_SIZE = 10**7  # below this a transfer takes milliseconds: more repetitions, so the best is not noise
TINY_REPEAT = 10
PATTERN_MAX_COLUMNS = 1 << 16
PREWARM_CHUNK = 16 * MIB
UPLOAD_CHUNK = 256 * KIB
DOWNLOAD_CHUNK = MIB
MAX_MODEL_BYTES = 2 * GIB
SAMPLE_SECONDS = 0.02
TREE_REFRESH_SAMPLES = 10
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
MIN_RATIO = 0.5
MAX_RSS_GROWTH_MIB = 256.0
LOG_LINES_SHOWN = 20
ERROR_TEXT = 200
STORE_MODULE = "fltraining.storage.embedded"


@dataclass(frozen=True)
class ModelFile:
    """One generated model file: its nominal size, path, real byte count and sha256."""

    size: int
    path: Path
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class Target:
    """Where transfers go: a label, its blob store, and its upload and download URLs."""

    name: str
    blob_store: str
    upload_path: str
    download_path: str  # with `{model_id}`

    @property
    def is_bare(self) -> bool:
        """Whether this is the baseline."""
        return self.name == "bare"

    @property
    def label(self) -> str:
        """'bare' or 'service (files)'."""
        return self.name if self.is_bare else f"{self.name} ({self.blob_store})"


BARE = Target("bare", "—", "/files/", "/files/{model_id}")
SERVICE_FILES = Target("service", "files", "/api/models/", "/api/models/{model_id}/")
SERVICE_GRIDFS = Target("service", "gridfs", "/api/models/", "/api/models/{model_id}/")


@dataclass
class Direction:
    """One direction's repetitions: the seconds of each success and every error."""

    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether it ran at least once and never failed."""
        return bool(self.seconds) and not self.errors

    @property
    def best(self) -> float | None:
        """The fastest run, when all runs succeeded."""
        return min(self.seconds) if self.ok else None


@dataclass(frozen=True)
class Growth:
    """Peak RSS growth in MiB per role (`service`, `store`, ...) and summed over the process tree."""

    vm: dict[str, float]
    anon: dict[str, float]
    vm_total: float
    anon_total: float


@dataclass
class Measurement:
    """Everything measured for one target and one size."""

    target: Target
    model: ModelFile
    upload: Direction = field(default_factory=Direction)
    download: Direction = field(default_factory=Direction)
    sha_checked: int = 0
    sha_mismatches: int = 0
    growth: Growth | None = None

    @property
    def intact(self) -> bool | None:
        """Whether every download matched (None when none completed)."""
        return None if not self.sha_checked else self.sha_mismatches == 0

    def rate(self, direction: Direction) -> float | None:
        """MB/s of the best run of a direction."""
        best = direction.best
        return None if best is None else self.model.nbytes / best / MB


# --- sizes and files --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'100M' → 100_000_000 bytes (10³, 10⁶, 10⁹)."""
    text = text.strip()
    scale = SUFFIXES.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KMGkmg")) * scale)


def size_label(size: int) -> str:
    """100_000_000 → '100 MB'."""
    for suffix, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:g} {suffix}"
    return f"{size} B"


def pattern_columns(count: int) -> int:
    """The largest divisor of `count` not above PATTERN_MAX_COLUMNS (the repeated row's length)."""
    for columns in range(min(count, PATTERN_MAX_COLUMNS), 0, -1):
        if count % columns == 0:
            return columns
    return 1


def sha256_of(path: Path) -> str:
    """The file's sha256, read in large chunks (which also puts it in the page cache)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(PREWARM_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def prewarm(path: Path) -> None:
    """Read the file once so its pages are in the page cache."""
    buffer = bytearray(PREWARM_CHUNK)
    with path.open("rb", buffering=0) as source:
        while source.readinto(buffer):
            pass


def make_model(directory: Path, size: int, seed: int) -> ModelFile:
    """A safetensors file of one float32 tensor of size/4 values, a random row repeated (no big array)."""
    count = size // FLOAT32_BYTES
    columns = pattern_columns(count)
    row = np.random.default_rng(seed).random(columns, dtype=np.float32)
    tensor = np.broadcast_to(row, (count // columns, columns))
    path = directory / f"model-{size}.safetensors"
    write_tensors(path, {"w": tensor}, "safetensors")
    return ModelFile(size, path, path.stat().st_size, sha256_of(path))


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """The direct children of a process, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children_of(current))
    return tree


def start_time(pid: int) -> str | None:
    """A process's start time from /proc/<pid>/stat (tells it apart from a later process with its id)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def command_of(pid: int) -> str:
    """A process's command line, or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_leftovers(started: dict[int, str | None], timeout: float) -> None:
    """SIGTERM, then SIGKILL, the recorded descendants (same id and start time) still running."""
    alive = [pid for pid, began in started.items() if began is not None and start_time(pid) == began]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for processes that are not our children to exit
        alive = [pid for pid in alive if start_time(pid) == started[pid]]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class ServerProcess:
    """A server subprocess, ready once GET /health answers 200; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.command = command
        self.env = env
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.descendants: dict[int, str | None] = {}

    @property
    def base_url(self) -> str:
        """Where it answers."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start and poll /health until 200 (RuntimeError with the log when it exits or stays unready)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode} while starting (its log is below)")
            if self.healthy():
                self.remember_descendants()
                return
            time.sleep(0.1)  # polling for readiness
        raise RuntimeError(f"not healthy after {START_TIMEOUT:.0f} s (its log is below)")

    def healthy(self) -> bool:
        """Whether GET /health answers 200 now."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def remember_descendants(self) -> None:
        """Record the descendants (id and start time), to stop any the server leaves behind."""
        for pid in process_tree(self.pid)[1:]:
            self.descendants.setdefault(pid, start_time(pid))

    def stop(self) -> None:
        """Stop the server, then any descendant it left running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.remember_descendants()
        wait_exit(self.process, STOP_TIMEOUT)
        stop_leftovers(self.descendants, STOP_TIMEOUT)
        self.process = None

    def log(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def service_env(data_dir: Path, blob_store: str) -> dict[str, str]:
    """The inherited environment without FLTRAINING_*, plus the service's settings for this run."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("FLTRAINING_")},
        "FLTRAINING_DATA_DIR": str(data_dir),
        "FLTRAINING_EMBEDDED_PORT": str(free_port()),
        "FLTRAINING_MAX_MODEL_BYTES": str(MAX_MODEL_BYTES),
        "FLTRAINING_PASSWORD_HASH_TIME_COST": "1",
        "FLTRAINING_LOG_LEVEL": "WARNING",
        "FLTRAINING_BLOB_STORE": blob_store,
    }


def server_for(target: Target, directory: Path) -> ServerProcess:
    """The subprocess serving a target, on a fresh directory."""
    directory.mkdir(parents=True)
    port = free_port()
    log_path = directory.parent / f"{directory.name}.log"
    if target.is_bare:
        env = {name: value for name, value in os.environ.items() if not name.startswith("FLTRAINING_")}
        command = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(port), str(directory)]
        return ServerProcess(command, env, port, log_path)
    command = [sys.executable, "-m", "routes.cli", "serve", "--port", str(port)]
    return ServerProcess(command, service_env(directory, target.blob_store), port, log_path)


# --- memory sampling ---------------------------------------------------------------------------


def memory_kib(pid: int) -> tuple[int, int] | None:
    """VmRSS and RssAnon of a process in KiB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "RssAnon"}:
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


def role_of(pid: int, root: int, root_role: str) -> str:
    """'service'/'server' for the root, 'store' for the embedded store, else 'other'."""
    if pid == root:
        return root_role
    return "store" if STORE_MODULE in command_of(pid) else "other"


class RssSampler:
    """Samples a process tree's RSS every SAMPLE_SECONDS in a thread; the growth over the first sample."""

    def __init__(self, root: int, root_role: str) -> None:
        self.root = root
        self.root_role = root_role
        self.roles: dict[int, str] = {}
        self.base: dict[str, list[int]] = {}
        self.peak: dict[str, list[int]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="rss-sampler", daemon=True)

    def sample(self, pids: Sequence[int]) -> dict[str, list[int]]:
        """[VmRSS, RssAnon] in KiB per role, and under 'total' summed over all."""
        sums: dict[str, list[int]] = {"total": [0, 0]}
        for pid in pids:
            memory = memory_kib(pid)
            if memory is None:
                continue
            role = self.roles.setdefault(pid, role_of(pid, self.root, self.root_role))
            for key in (role, "total"):
                current = sums.setdefault(key, [0, 0])
                current[0] += memory[0]
                current[1] += memory[1]
        return sums

    def record(self, sums: dict[str, list[int]]) -> None:
        """Keep the per-role maxima."""
        for role, (vm, anon) in sums.items():
            peak = self.peak.setdefault(role, [vm, anon])
            peak[0], peak[1] = max(peak[0], vm), max(peak[1], anon)

    def start(self) -> None:
        """Take the baseline now and sample in the background."""
        self.base = self.sample(process_tree(self.root))
        self.record(self.base)
        self.thread.start()

    def run(self) -> None:
        """Sample until stopped, refreshing the process tree now and then."""
        pids, count = process_tree(self.root), 0
        while not self.stopping.wait(SAMPLE_SECONDS):
            count += 1
            if count % TREE_REFRESH_SAMPLES == 0:
                pids = process_tree(self.root)
            self.record(self.sample(pids))

    def stop(self) -> Growth:
        """Stop sampling; the peak growth in MiB per role and in total."""
        self.stopping.set()
        self.thread.join()
        self.record(self.sample(process_tree(self.root)))

        def growth(role: str, index: int) -> float:
            return (self.peak[role][index] - self.base.get(role, [0, 0])[index]) / KIB

        roles = [role for role in self.peak if role != "total"]
        return Growth(vm={role: growth(role, 0) for role in roles},
                      anon={role: growth(role, 1) for role in roles},
                      vm_total=growth("total", 0), anon_total=growth("total", 1))


# --- the client --------------------------------------------------------------------------------


async def failure(response: aiohttp.ClientResponse, what: str) -> str:
    """'upload 500: <body start>' for a refused request."""
    body = (await response.text(errors="replace"))[:ERROR_TEXT].replace("\n", " ").replace("|", "\\|")
    return f"{what} {response.status}: {body}"


async def register(session: aiohttp.ClientSession) -> dict[str, str]:
    """Register the bench user on the service; its token header."""
    async with session.post("/api/users/", json={"username": USERNAME, "password": PASSWORD}) as response:
        if response.status != 201:
            raise RuntimeError(await failure(response, "register"))
        return {"Authorization": f"Token {(await response.json())['token']}"}


async def upload(session: aiohttp.ClientSession, target: Target, model: ModelFile,
                 headers: dict[str, str]) -> tuple[float, str]:
    """Send the file as multipart, streamed from disk; seconds and the new model id."""
    with model.path.open("rb") as source:
        form = FormData()
        form.add_field("name", f"bench {size_label(model.size)}")
        form.add_field("description", "transfer benchmark")
        form.add_field("model_file", source, filename="model.safetensors",
                       content_type="application/octet-stream")
        started = time.perf_counter()
        async with session.post(target.upload_path, data=form, headers=headers) as response:
            if response.status != 201:
                raise RuntimeError(await failure(response, "upload"))
            model_id = str((await response.json())["model_id"])
        return time.perf_counter() - started, model_id


async def download(session: aiohttp.ClientSession, target: Target, model_id: str,
                   headers: dict[str, str]) -> tuple[float, str, int]:
    """Fetch the file, hashing it chunk by chunk; seconds, sha256 and byte count."""
    digest, received = hashlib.sha256(), 0
    started = time.perf_counter()
    async with session.get(target.download_path.format(model_id=model_id), headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(await failure(response, "download"))
        async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
            digest.update(chunk)
            received += len(chunk)
    return time.perf_counter() - started, digest.hexdigest(), received


def describe(error: BaseException) -> str:
    """An error as one table-safe line."""
    text = str(error) or type(error).__name__
    return text.replace("\n", " ").replace("|", "\\|")[:ERROR_TEXT]


async def transfer_once(session: aiohttp.ClientSession, measurement: Measurement,
                        headers: dict[str, str]) -> None:
    """One upload and, when it succeeded, one download with its sha256 check."""
    target, model = measurement.target, measurement.model
    try:
        seconds, model_id = await upload(session, target, model, headers)
    except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError, KeyError, ValueError) as error:
        measurement.upload.errors.append(describe(error))
        return
    measurement.upload.seconds.append(seconds)
    try:
        seconds, sha256, received = await download(session, target, model_id, headers)
    except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as error:
        measurement.download.errors.append(describe(error))
        return
    measurement.download.seconds.append(seconds)
    measurement.sha_checked += 1
    if sha256 != model.sha256:
        measurement.sha_mismatches += 1
        measurement.download.errors.append(f"sha256 mismatch ({received:,} of {model.nbytes:,} bytes)")


async def measure_target(server: ServerProcess, target: Target, models: Sequence[ModelFile],
                         repeats: Sequence[int]) -> list[Measurement]:
    """Every size through one running target, with its RSS sampled per size."""
    results = [Measurement(target, model) for model in models]
    async with aiohttp.ClientSession(base_url=server.base_url, timeout=REQUEST_TIMEOUT) as session:
        headers = {} if target.is_bare else await register(session)
        for measurement, repeat in zip(results, repeats, strict=True):
            prewarm(measurement.model.path)
            sampler = RssSampler(server.pid, "server" if target.is_bare else "service")
            sampler.start()
            try:
                for _ in range(repeat):
                    await transfer_once(session, measurement, headers)
            finally:
                measurement.growth = sampler.stop()
    return results


def run_target(target: Target, directory: Path, models: Sequence[ModelFile],
               repeats: Sequence[int]) -> tuple[list[Measurement], str]:
    """Start the target's server, measure, stop it; the measurements and the server's log."""
    server = server_for(target, directory)
    try:
        with server:
            results = asyncio.run(measure_target(server, target, models, repeats))
    except (RuntimeError, OSError, aiohttp.ClientError, TimeoutError) as error:
        results = [Measurement(target, model) for model in models]
        for measurement in results:
            measurement.upload.errors.append(f"target failed: {describe(error)}")
    return results, server.log()


# --- the report --------------------------------------------------------------------------------


def rate_cell(measurement: Measurement, direction: Direction) -> str:
    """'123.4 (0.81 s)', or the failure."""
    rate = measurement.rate(direction)
    if rate is not None:
        return f"{rate:,.1f} ({direction.best:.2f} s)"
    if direction.errors:
        return f"FAILED ({len(direction.errors)} of {len(direction.errors) + len(direction.seconds)})"
    return "not run"


def ratio(measurement: Measurement, baseline: Measurement | None, upload_side: bool) -> float | None:
    """The service's MB/s over the bare handler's, or None when either failed."""
    if baseline is None or measurement.target.is_bare:
        return None
    ours = measurement.rate(measurement.upload if upload_side else measurement.download)
    theirs = baseline.rate(baseline.upload if upload_side else baseline.download)
    return None if ours is None or theirs is None else ours / theirs


def ratio_cell(measurement: Measurement, baseline: Measurement | None, upload_side: bool) -> str:
    """'0.83', or why there is none."""
    if measurement.target.is_bare:
        return "—"
    if baseline is None or not (baseline.upload if upload_side else baseline.download).ok:
        return "baseline failed"
    value = ratio(measurement, baseline, upload_side)
    return "—" if value is None else f"{value:.2f}"


def growth_cell(growth: Growth | None, anon: bool) -> str:
    """'12.3 / 4.5 (Σ 16.8)' for service / store, or the bare server's own."""
    if growth is None:
        return "—"
    per_role, total = (growth.anon, growth.anon_total) if anon else (growth.vm, growth.vm_total)
    if "server" in per_role:
        return f"{per_role['server']:.1f}"
    parts = " / ".join(f"{per_role.get(role, 0.0):.1f}" for role in ("service", "store"))
    if "other" in per_role:
        parts += f" / other {per_role['other']:.1f}"
    return f"{parts} (Σ {total:.1f})"


def intact_cell(measurement: Measurement) -> str:
    """'yes (3/3)', 'NO (1 of 3 differ)', or '—'."""
    if measurement.intact is None:
        return "—"
    if measurement.intact:
        return f"yes ({measurement.sha_checked}/{measurement.sha_checked})"
    return f"NO ({measurement.sha_mismatches} of {measurement.sha_checked} differ)"


def table(results: Sequence[Measurement]) -> list[str]:
    """The Markdown table."""
    baselines = {m.model.size: m for m in results if m.target.is_bare}
    lines = [
        ("| target | blob store | size | upload MB/s (s) | download MB/s (s) | upload vs bare "
         "| download vs bare | peak RSS growth MiB (service / store) | of which anon MiB | sha256 ok |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in results:
        baseline = baselines.get(m.model.size)
        lines.append(
            f"| {m.target.name} | {m.target.blob_store} | {size_label(m.model.size)} "
            f"| {rate_cell(m, m.upload)} | {rate_cell(m, m.download)} "
            f"| {ratio_cell(m, baseline, True)} | {ratio_cell(m, baseline, False)} "
            f"| {growth_cell(m.growth, anon=False)} | {growth_cell(m.growth, anon=True)} | {intact_cell(m)} |"
        )
    return lines


def error_lines(results: Sequence[Measurement]) -> list[str]:
    """Every recorded error, one line each."""
    lines = []
    for m in results:
        for side, direction in (("upload", m.upload), ("download", m.download)):
            for error in direction.errors:
                lines.append(f"- {m.target.label}, {size_label(m.model.size)}, {side}: {error}")
    return lines


def ratio_verdict(results: Sequence[Measurement], baselines: dict[int, Measurement],
                  upload_side: bool) -> str:
    """Whether every size reaches MIN_RATIO of the bare handler in one direction."""
    side = "upload" if upload_side else "download"
    values: list[tuple[Measurement, float | None]] = [
        (m, ratio(m, baselines.get(m.model.size), upload_side)) for m in results]
    if any(value is None for _, value in values):
        missing = ", ".join(size_label(m.model.size) for m, value in values if value is None)
        return f"{side} ≥ {MIN_RATIO} × bare at every size: UNDECIDED (no ratio at {missing}: a side failed)"
    worst_m, worst = min(values, key=lambda item: item[1] or 0.0)
    passed = (worst or 0.0) >= MIN_RATIO
    return (f"{side} ≥ {MIN_RATIO} × bare at every size: {'PASS' if passed else 'FAIL'} "
            f"(lowest {worst:.2f} at {size_label(worst_m.model.size)})")


def memory_verdict(results: Sequence[Measurement]) -> str:
    """Whether the summed peak VmRSS growth stays under MAX_RSS_GROWTH_MIB at 1 GB."""
    label = f"peak RSS growth (service + store) < {MAX_RSS_GROWTH_MIB:.0f} MiB at 1 GB"
    large = [m for m in results if m.model.size >= LARGE_SIZE]
    if not large:
        return f"{label}: not measured (no size ≥ 1 GB in --sizes)"
    growth = large[-1].growth
    if growth is None or not (large[-1].upload.seconds or large[-1].download.seconds):
        return f"{label}: UNDECIDED (the transfers failed)"
    passed = growth.vm_total < MAX_RSS_GROWTH_MIB
    outcome = "PASS" if passed else "FAIL"
    return f"{label}: {outcome} ({growth.vm_total:.1f} MiB, anon {growth.anon_total:.1f} MiB)"


def intact_verdict(results: Sequence[Measurement]) -> str:
    """Whether every transfer succeeded and every download matched."""
    failed = [m for m in results if not (m.upload.ok and m.download.ok and m.intact)]
    if not failed:
        return "files intact: PASS (every download's sha256 matched)"
    return "files intact: FAIL (" + ", ".join(size_label(m.model.size) for m in failed) + ")"


def verdicts(results: Sequence[Measurement]) -> list[str]:
    """Verdict lines for each service target (the goal applies to blob store `files`)."""
    baselines = {m.model.size: m for m in results if m.target.is_bare}
    lines = []
    for blob_store, note in (("files", "target"), ("gridfs", "informational")):
        ours = [m for m in results if not m.target.is_bare and m.target.blob_store == blob_store]
        if not ours:
            continue
        for verdict in (ratio_verdict(ours, baselines, True), ratio_verdict(ours, baselines, False),
                        memory_verdict(ours), intact_verdict(ours)):
            lines.append(f"- service, blob store `{blob_store}` ({note}): {verdict}")
    return lines


def log_lines(logs: dict[str, str]) -> list[str]:
    """What each server logged (at WARNING and above for the service), shortened."""
    lines = []
    for name, text in logs.items():
        logged = [line for line in text.splitlines() if line.strip()]
        if not logged:
            continue
        lines.append(f"- {name}: {len(logged)} line(s) logged; first {min(len(logged), LOG_LINES_SHOWN)}:")
        lines.extend(f"    {line[:300]}" for line in logged[:LOG_LINES_SHOWN])
    return lines


def load_text(load: tuple[float, float, float]) -> str:
    """'0.52 0.37 0.18'."""
    return " ".join(f"{value:.2f}" for value in load)


# --- the bare server ---------------------------------------------------------------------------


def bare_app(directory: Path) -> web.Application:
    """The baseline: stream the multipart file part to disk with its sha256, fsync; send files back."""

    async def receive(request: web.Request) -> web.Response:
        reader = await request.multipart()
        name: str | None = None
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                return web.json_response({"detail": "nested multipart"}, status=400)
            if part.name != "model_file":
                await part.read()
                continue
            name = uuid.uuid4().hex
            digest = hashlib.sha256()
            with (directory / name).open("wb") as out:  # one client at a time: plain writes on the loop
                while chunk := await part.read_chunk(UPLOAD_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        if name is None:
            return web.json_response({"detail": "missing model_file"}, status=400)
        return web.json_response({"model_id": name}, status=201)

    async def send(request: web.Request) -> web.FileResponse:
        return web.FileResponse(directory / request.match_info["name"])

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/files/", receive)
    app.router.add_get("/files/{name}", send)
    app.router.add_get("/health", health)
    return app


def run_bare_server(port: int, directory: Path) -> None:
    """Serve the baseline until SIGTERM."""
    web.run_app(bare_app(directory), host="127.0.0.1", port=port, print=None, access_log=None)


# --- main --------------------------------------------------------------------------------------


def repeats_for(sizes: Sequence[int], repeat: int | None) -> list[int]:
    """`--repeat` for every size, or TINY_REPEAT below 10 MB, SMALL_REPEAT below 1 GB and 1 from there on."""
    return [repeat or (1 if size >= LARGE_SIZE else TINY_REPEAT if size < TINY_SIZE else SMALL_REPEAT)
            for size in sizes]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated sizes, 10³/10⁶/10⁹ bytes (default {DEFAULT_SIZES})")
    chosen.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"runs per case, best kept (default {TINY_REPEAT} below 10 MB, {SMALL_REPEAT} below 1 GB, "
                             "1 from 1 GB)")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run through the normal cleanup."""
    raise SystemExit(128 + signum)


def benchmark(args: argparse.Namespace) -> int:
    """Generate the files, measure every target, print the report; 1 when a transfer failed."""
    listed = (QUICK_SIZES if args.quick else args.sizes).split(",")
    sizes = [parse_size(text) for text in listed if text.strip()]
    repeats = repeats_for(sizes, args.repeat)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="fltraining-transfer-bench-"))
    results: list[Measurement] = []
    logs: dict[str, str] = {}
    started = time.monotonic()
    try:
        models_dir = work / "models"
        models_dir.mkdir()
        models = [make_model(models_dir, size, seed) for seed, size in enumerate(sizes)]
        for index, target in enumerate((BARE, SERVICE_FILES, SERVICE_GRIDFS)):
            directory = work / f"{index}-{target.name}-{target.blob_store if not target.is_bare else 'bare'}"
            measured, logs[target.label] = run_target(target, directory, models, repeats)
            results.extend(measured)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Model transfer, {', '.join(size_label(size) for size in sizes)} safetensors files "
          f"(repeats {', '.join(map(str, repeats))}, best kept), embedded store, 1 worker, "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"Command: `{shlex.join(sys.orig_argv)}`; {os.cpu_count()} CPUs; "
          f"load average before {load_text(load_before)}, after {load_text(os.getloadavg())}")
    print()
    print("\n".join(table(results)))
    errors = error_lines(results)
    if errors:
        print("\nErrors:")
        print("\n".join(errors))
    print("\nVerdicts:")
    print("\n".join(verdicts(results)))
    logged = log_lines(logs)
    if logged:
        print("\nServer logs:")
        print("\n".join(logged))
    sys.stdout.flush()
    return 1 if errors else 0


def main() -> None:
    """Run the benchmark, or the bare server when re-invoked as one."""
    args = parse_args()
    if args.bare_server:
        run_bare_server(int(args.bare_server[0]), Path(args.bare_server[1]))
        return
    signal.signal(signal.SIGTERM, terminate)
    sys.exit(benchmark(args))


if __name__ == "__main__":
    main()
