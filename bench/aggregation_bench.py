"""FedAvg aggregation benchmark: the service's block-major mean over memory-mapped blob files against
a NumPy memory-read baseline and Flower's `flwr.server.strategy.aggregate.aggregate`.

For every N clients × P float32 parameters (default N ∈ {10, 100}, P ∈ {1M, 25M}; the model is
`--tensors` 1-D tensors sharing the P parameters), each update is written once as a safetensors
file to a temporary directory, then read back into the page cache before every case, so what is
measured is reading update bytes from memory, not the disk. Three measurements, each in a fresh
`spawn`ed process (its peak RSS, `ru_maxrss`, belongs to that case alone), each the best of
`--repeat` runs:

- ours: the engine's path with the `files` blob store — `mean_of_files`: every update file mapped
  into memory (zero copy: its pages are the page cache's), the weighted mean accumulated
  block-major in float64 (each cache-sized block takes every update's slice) on all cores, written
  straight into a mapped safetensors result file. Memory is reported twice: peak heap (RssAnon,
  what the process allocates; the memory target) and peak mapped file pages (RssFile, the page
  cache's pages the process touched, which grow with N·P and are not the process's to keep).
- baseline: the same update bytes held in memory and summed once with `np.add.reduce` (float32),
  which reads every byte once and does nothing else: the physical read limit of this machine.
  When N·P·4 bytes exceed `--baseline-budget`, a subset of that size (far larger than the CPU
  cache) is held and cycled through until N·P values have been summed.
- Flower: `aggregate(results)` on the same arrays, all N updates in memory at once as its API
  requires; only the call is timed (loading its inputs is not). It runs only when its estimated
  need (2·N·P·4 bytes: the inputs and its weighted copies) fits in the available memory with a
  margin, and its result is checked against ours with `np.allclose`.

GB/s counts the float32 payload of the updates (N·P·4 bytes, 10⁹ bytes per GB). Targets: ours
≥ 50 % of the baseline's GB/s, ≥ 2× Flower's speed, and our peak memory independent of N.
Then the robust rules' time, heap and speed against Flower (`bench/robust_bench.py`, skipped with
`--no-rules`), and the robust rules and server optimizers against Flower on the same inputs
(`bench/flower_equality.py`).
Usage: `python bench/aggregation_bench.py [--quick] [--sizes 1M,25M] [--clients 10,100] [--equality-only]`.
"""

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from fltraining.weights.aggregate import mean_of_files
from fltraining.weights.formats import dump_tensors, load_tensors
from fltraining.weights.signature import Signature, signature_of

FLOAT32_BYTES = 4
MIB = 1 << 20
GIB = 1 << 30
GB = 1e9
SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9}
PREWARM_CHUNK = 16 * MIB
FLOWER_MARGIN_BYTES = 4 * GIB
FLOWER_MAX_SHARE = 0.75
FLOWER_RTOL = 1e-5
FLOWER_ATOL = 1e-6
MEMORY_TOLERANCE = 0.10

type Row = dict[str, str]


@dataclass(frozen=True)
class Case:
    """One benchmarked combination and the files holding its updates."""

    clients: int
    parameters: int
    paths: list[str]
    sample_sizes: list[int]

    @property
    def payload_bytes(self) -> int:
        """Bytes of float32 update data the aggregation reads."""
        return self.clients * self.parameters * FLOAT32_BYTES


@dataclass(frozen=True)
class Outcome:
    """What a child process reports: best time, peak RSS, and the peak before measuring began."""

    seconds: float
    peak_mib: float
    import_mib: float
    mapped_mib: float = 0.0


# -- measured in child processes ---------------------------------------------------------------


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ResidentPeaks:
    """Peak heap (RssAnon) and mapped-file (RssFile) residency of this process, sampled from /proc."""

    def __init__(self) -> None:
        self.anon_mib = 0.0
        self.file_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "RssAnon":
                self.anon_mib = max(self.anon_mib, int(value.split()[0]) / 1024)
            elif key == "RssFile":
                self.file_mib = max(self.file_mib, int(value.split()[0]) / 1024)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._read()

    def __enter__(self) -> "ResidentPeaks":
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def time_ours(combine: Callable[[list[Path], Signature, Path], object], paths: list[str], repeat: int,
              out: str) -> dict[str, float]:
    """`combine(update files, signature, result file)` timed, best of `repeat`, with this process's peak heap
    (RssAnon) and mapped file pages (RssFile)."""
    import_mib = _peak_mib()
    signature = signature_of(load_tensors(paths[0]))
    best = float("inf")
    with ResidentPeaks() as peaks:
        for _ in range(repeat):
            Path(out).unlink(missing_ok=True)
            started = time.perf_counter()
            combine([Path(path) for path in paths], signature, Path(out))
            best = min(best, time.perf_counter() - started)
    return {"seconds": best, "peak_mib": peaks.anon_mib, "import_mib": import_mib, "mapped_mib": peaks.file_mib}


def measure_ours(paths: list[str], sample_sizes: list[int], repeat: int, out: str) -> dict[str, float]:
    """The engine's path: the updates' blob files mapped, block-major mean on every core straight into a
    mapped safetensors result file (`out`)."""
    return time_ours(lambda files, signature, result: mean_of_files(files, sample_sizes, signature, "safetensors",
                                                                    result), paths, repeat, out)


def _sum_all(held: Sequence[list[np.ndarray]], updates: int) -> float:
    total = 0.0
    for index in range(updates):
        for array in held[index % len(held)]:
            total += float(np.add.reduce(array))
    return total


def measure_baseline(paths: list[str], repeat: int, budget_bytes: int) -> dict[str, float]:
    """Sum the update bytes once with np.add.reduce, from memory; the cycled subset fits `budget_bytes`."""
    import_mib = _peak_mib()
    update_bytes = Path(paths[0]).stat().st_size
    kept = max(1, min(len(paths), budget_bytes // update_bytes))
    buffers = [Path(path).read_bytes() for path in paths[:kept]]
    held = [list(load_tensors(data).values()) for data in buffers]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        _sum_all(held, len(paths))
        best = min(best, time.perf_counter() - started)
    return {"seconds": best, "peak_mib": _peak_mib(), "import_mib": import_mib}


def time_flower(function: Callable[[list[tuple[list[np.ndarray], int]]], list[np.ndarray]], paths: list[str],
                sample_sizes: list[int], repeat: int, out: str) -> dict[str, float]:
    """A Flower function on all updates held in memory, as its API takes them (only the call is timed); its
    result saved to `out`."""
    import_mib = _peak_mib()
    loaded = [load_tensors(Path(path).read_bytes()) for path in paths]
    names = list(loaded[0])
    results = [
        ([tensors[name] for name in names], size) for tensors, size in zip(loaded, sample_sizes, strict=True)
    ]
    best = float("inf")
    combined: list[np.ndarray] = []
    for _ in range(repeat):
        started = time.perf_counter()
        combined = function(results)
        best = min(best, time.perf_counter() - started)
    Path(out).write_bytes(dump_tensors(dict(zip(names, combined, strict=True)), "safetensors"))
    return {"seconds": best, "peak_mib": _peak_mib(), "import_mib": import_mib}


def measure_flower(paths: list[str], sample_sizes: list[int], repeat: int, out: str) -> dict[str, float]:
    """Flower's FedAvg `aggregate` (see `time_flower`)."""
    from flwr.server.strategy.aggregate import aggregate

    return time_flower(aggregate, paths, sample_sizes, repeat, out)


# -- orchestration -----------------------------------------------------------------------------


def in_fresh_process(function: Callable[..., dict[str, float]], *args: Any) -> Outcome | str:
    """Run `function` in a new spawned interpreter; a message instead if the child died."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return Outcome(**pool.submit(function, *args).result())
    except BrokenProcessPool:
        return "failed (the child process died; out of memory?)"


def tensor_sizes(parameters: int, tensors: int) -> list[int]:
    """`parameters` split into `tensors` near-equal parts."""
    base, extra = divmod(parameters, tensors)
    return [base + (1 if index < extra else 0) for index in range(tensors)]


def sample_size(index: int) -> int:
    """The deterministic, uneven sample size of client `index`."""
    return 50 + (37 * index) % 151


def write_updates(directory: Path, parameters: int, tensors: int, clients: int, seed: int) -> list[str]:
    """Write `clients` random float32 updates as safetensors files, one in memory at a time."""
    paths = []
    for index in range(clients):
        rng = np.random.default_rng([seed, parameters, index])
        update = {
            f"layer{number}.weight": rng.standard_normal(size, dtype=np.float32)
            for number, size in enumerate(tensor_sizes(parameters, tensors))
        }
        path = directory / f"update-{index:04d}.safetensors"
        path.write_bytes(dump_tensors(update, "safetensors"))
        paths.append(str(path))
        del update
    return paths


def prewarm(paths: Sequence[str]) -> None:
    """Read every file once so the measured reads come from the page cache."""
    buffer = bytearray(PREWARM_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (page cache counts as available)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def flower_need_bytes(case: Case) -> int:
    """Flower's estimated peak: its N inputs, their N weighted copies, a few P-sized temporaries."""
    return 2 * case.payload_bytes + 3 * case.parameters * FLOAT32_BYTES


def flower_refusal(case: Case) -> str | None:
    """Why Flower is not run for `case`, or None."""
    if importlib.util.find_spec("flwr") is None:
        return "flwr not installed"
    need, available = flower_need_bytes(case), available_bytes()
    if need > min(available - FLOWER_MARGIN_BYTES, FLOWER_MAX_SHARE * available):
        return f"skipped (needs ~{need / GB:.1f} GB, {available / GB:.1f} GB available)"
    return None


def compare(ours_path: Path, flower_path: Path) -> str:
    """Whether the two means agree (np.allclose), with the largest absolute difference."""
    ours, flower = load_tensors(ours_path), load_tensors(flower_path)
    worst = max(float(np.max(np.abs(ours[name] - flower[name]))) for name in ours)
    agree = all(np.allclose(ours[name], flower[name], rtol=FLOWER_RTOL, atol=FLOWER_ATOL) for name in ours)
    return f"{'yes' if agree else 'NO'} (max Δ {worst:.1e})"


def run_case(case: Case, workdir: Path, repeat: int, budget_bytes: int) -> dict[str, Any]:
    """Baseline, ours and Flower for one case, each in its own process."""
    prewarm(case.paths)
    ours_out, flower_out = workdir / "ours.safetensors", workdir / "flower.safetensors"
    baseline = in_fresh_process(measure_baseline, case.paths, repeat, budget_bytes)
    ours = in_fresh_process(measure_ours, case.paths, case.sample_sizes, repeat, str(ours_out))
    flower: Outcome | str | None = flower_refusal(case)
    if flower is None:
        flower = in_fresh_process(measure_flower, case.paths, case.sample_sizes, repeat, str(flower_out))
    match = "—"
    if isinstance(ours, Outcome) and isinstance(flower, Outcome):
        match = compare(ours_out, flower_out)
    for path in (ours_out, flower_out):
        path.unlink(missing_ok=True)
    return {"case": case, "baseline": baseline, "ours": ours, "flower": flower, "match": match}


# -- report ------------------------------------------------------------------------------------


def parse_count(text: str) -> int:
    """`25M` → 25_000_000; `1000` → 1000."""
    text = text.strip().upper()
    if text and text[-1] in SUFFIXES:
        return int(float(text[:-1]) * SUFFIXES[text[-1]])
    return int(text)


def show_count(value: int) -> str:
    """25_000_000 → `25M`."""
    for suffix, scale in sorted(SUFFIXES.items(), key=lambda item: -item[1]):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{suffix}"
    return str(value)


def gbps(case: Case, outcome: Outcome) -> float:
    """Update payload read per second, in GB/s."""
    return case.payload_bytes / outcome.seconds / GB


COLUMNS = [
    "N",
    "P",
    "our time s",
    "our GB/s",
    "our peak heap MiB",
    "our peak mapped MiB",
    "baseline GB/s",
    "ours/baseline %",
    "Flower time s",
    "Flower peak RSS MiB",
    "ours/Flower speed-up",
    "= Flower (allclose)",
]


def row(measured: dict[str, Any]) -> Row:
    """One table row; failures and skips are written where their numbers would be."""
    case: Case = measured["case"]
    ours, baseline, flower = measured["ours"], measured["baseline"], measured["flower"]
    cells = {name: "—" for name in COLUMNS} | {"N": str(case.clients), "P": show_count(case.parameters)}
    if isinstance(ours, Outcome):
        cells |= {
            "our time s": f"{ours.seconds:.3f}",
            "our GB/s": f"{gbps(case, ours):.2f}",
            "our peak heap MiB": f"{ours.peak_mib:.0f}",
            "our peak mapped MiB": f"{ours.mapped_mib:.0f}",
        }
    else:
        cells["our time s"] = ours
    if isinstance(baseline, Outcome):
        cells["baseline GB/s"] = f"{gbps(case, baseline):.2f}"
        if isinstance(ours, Outcome):
            cells["ours/baseline %"] = f"{100 * baseline.seconds / ours.seconds:.0f} %"
    else:
        cells["baseline GB/s"] = baseline
    if isinstance(flower, Outcome):
        cells |= {"Flower time s": f"{flower.seconds:.3f}", "Flower peak RSS MiB": f"{flower.peak_mib:.0f}"}
        if isinstance(ours, Outcome):
            cells["ours/Flower speed-up"] = f"{flower.seconds / ours.seconds:.2f}×"
    else:
        cells["Flower time s"] = flower
    cells["= Flower (allclose)"] = measured["match"]
    return cells


def table(rows: Sequence[Row]) -> str:
    """A markdown table of `rows`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells[name] for name in COLUMNS) + " |" for cells in rows]
    return "\n".join(lines)


def import_note(results: Sequence[dict[str, Any]]) -> str:
    """A child's peak RSS before it measures (interpreter, imports, spawn start-up; part of every peak)."""

    def first(key: str) -> str:
        values = [r[key].import_mib for r in results if isinstance(r[key], Outcome)]
        return f"{values[0]:.0f} MiB" if values else "n/a"

    return (
        f"Peak RSS before measuring (included in the peaks): ours {first('ours')}, Flower {first('flower')}."
    )


def verdict_baseline(results: Sequence[dict[str, Any]]) -> str:
    """Target 1: ours ≥ 50 % of the baseline's GB/s in every case."""
    shares = [
        (r["baseline"].seconds / r["ours"].seconds, r["case"])
        for r in results
        if isinstance(r["ours"], Outcome) and isinstance(r["baseline"], Outcome)
    ]
    if not shares:
        return "- ≥ 50 % of the baseline's GB/s: not measured"
    share, case = min(shares, key=lambda item: item[0])
    status = "PASS" if share >= 0.5 else "FAIL"
    return (
        f"- ≥ 50 % of the baseline's GB/s: {status} "
        f"(worst {100 * share:.0f} % at N={case.clients}, P={show_count(case.parameters)})"
    )


def verdict_flower(results: Sequence[dict[str, Any]]) -> str:
    """Target 2: ours ≥ 2× Flower's speed wherever Flower ran."""
    speedups = [
        (r["flower"].seconds / r["ours"].seconds, r["case"])
        for r in results
        if isinstance(r["ours"], Outcome) and isinstance(r["flower"], Outcome)
    ]
    missing = [r["case"] for r in results if not isinstance(r["flower"], Outcome)]
    skipped = (
        f"; not compared: {', '.join(f'N={c.clients} P={show_count(c.parameters)}' for c in missing)}"
        if missing
        else ""
    )
    if not speedups:
        return f"- ≥ 2× Flower's speed: not measured{skipped}"
    speedup, case = min(speedups, key=lambda item: item[0])
    status = "PASS" if speedup >= 2 else "FAIL"
    return (
        f"- ≥ 2× Flower's speed: {status} "
        f"(worst {speedup:.2f}× at N={case.clients}, P={show_count(case.parameters)}){skipped}"
    )


def verdict_memory(results: Sequence[dict[str, Any]]) -> str:
    """Target 3: from the smallest to the largest N, our peak RSS grows by under MEMORY_TOLERANCE of an
    update per extra update (holding the updates, O(N), would grow it by a whole update per update)."""
    by_size: dict[int, list[tuple[int, float]]] = {}
    for r in results:
        if isinstance(r["ours"], Outcome):
            by_size.setdefault(r["case"].parameters, []).append((r["case"].clients, r["ours"].peak_mib))
    compared = {size: sorted(peaks) for size, peaks in by_size.items() if len(peaks) > 1}
    if not compared:
        return "- peak memory independent of N: not measured (needs two values of N)"
    details, ok = [], True
    for size, peaks in sorted(compared.items()):
        (low_n, low), (high_n, high) = peaks[0], peaks[-1]
        share = max(0.0, high - low) / (high_n - low_n) / (size * FLOAT32_BYTES / MIB)
        ok &= share <= MEMORY_TOLERANCE
        listed = ", ".join(f"N={n}: {peak:.0f}" for n, peak in peaks)
        details.append(
            f"P={show_count(size)}: {listed} MiB, {100 * share:.1f} % of an update per extra update"
        )
    status = "PASS" if ok else "FAIL"
    return (
        f"- peak memory independent of N (growth ≤ {100 * MEMORY_TOLERANCE:.0f} % of an update's size per "
        f"extra update; holding updates would be 100 %): {status} ({'; '.join(details)})"
    )


def caption(args: argparse.Namespace, load_before: float, load_after: float) -> str:
    """How the table was measured."""
    return (
        f"FedAvg of N float32 updates of P parameters ({args.tensors} tensors), best of {args.repeat}; "
        "ours maps the safetensors files (page cache, no copy) and means them block-major on every core "
        "into a mapped result file, baseline sums the same bytes once from memory with np.add.reduce "
        f"(a ≤ {args.baseline_budget / GIB:.0f} GiB subset cycled when larger), Flower's time is its "
        "aggregate() call alone with every update already in memory. GB/s = N·P·4 bytes / time. "
        f"Python {sys.version.split()[0]}, NumPy {np.__version__}, {os.cpu_count()} CPUs, shared machine "
        f"(load average {load_before:.2f} before, {load_after:.2f} after): timings may be noisy."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,25M", help="parameter counts P, comma-separated (1M, 25M)")
    parser.add_argument("--clients", default="10,100", help="update counts N, comma-separated")
    parser.add_argument("--quick", action="store_true", help="P = 1M only (overrides --sizes)")
    parser.add_argument("--tensors", type=int, default=4, help="tensors sharing the P parameters")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best is kept")
    parser.add_argument("--baseline-budget", type=parse_count, default=GIB, help="bytes the baseline holds")
    parser.add_argument("--workdir", type=Path, default=None, help="where the update files go (a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rules", action="store_true",
                        help="skip the robust rules' table (bench/robust_bench.py: 10×1M, 100×1M, 10×25M)")
    parser.add_argument("--equality-only", action="store_true",
                        help="only the table of robust rules and server optimizers against Flower")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.tensors < 1:
        parser.error("--repeat and --tensors must be at least 1")
    args.sizes = [parse_count(text) for text in ("1M" if args.quick else args.sizes).split(",")]
    args.clients = sorted({parse_count(text) for text in args.clients.split(",")})
    return args


def check_disk(directory: Path, sizes: Sequence[int], clients: int) -> None:
    """Refuse to start when the largest set of update files would not fit on disk."""
    need = max(sizes) * clients * FLOAT32_BYTES
    free = shutil.disk_usage(directory).free
    if need > free * 0.8:
        raise SystemExit(f"the update files need {need / GB:.1f} GB; {free / GB:.1f} GB free in {directory}")


def print_equality() -> None:
    """The robust rules and server optimizers against Flower 1.42 on the same inputs (bench/flower_equality.py)."""
    if importlib.util.find_spec("flwr") is None:
        print("equality with Flower: flwr not installed (make bench-aggregation installs it in .venv-bench)")
        return
    from flower_equality import equality_table  # beside this file; it needs flwr

    print(f"Robust rules and server optimizers against Flower 1.42 on the same inputs ({time.strftime('%Y-%m-%d')})")
    print()
    print(equality_table())


def main(argv: Sequence[str] | None = None) -> None:
    """Run every case and print the table and the verdicts."""
    args = parse_args(argv)
    if args.equality_only:
        print_equality()
        return
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="aggregation-bench-", dir=args.workdir) as temporary:
        workdir = Path(temporary)
        check_disk(workdir, args.sizes, max(args.clients))
        for parameters in args.sizes:
            size_dir = workdir / show_count(parameters)
            size_dir.mkdir()
            started = time.perf_counter()
            paths = write_updates(size_dir, parameters, args.tensors, max(args.clients), args.seed)
            print(
                f"wrote {len(paths)} updates of P={show_count(parameters)} in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            for clients in args.clients:
                case = Case(clients, parameters, paths[:clients], [sample_size(i) for i in range(clients)])
                results.append(run_case(case, workdir, args.repeat, args.baseline_budget))
                print(f"measured N={clients} P={show_count(parameters)}", file=sys.stderr, flush=True)
            shutil.rmtree(size_dir)
    print(caption(args, load_before, os.getloadavg()[0]))
    print()
    print(table([row(r) for r in results]))
    print()
    print(import_note(results))
    print()
    print(verdict_baseline(results))
    print(verdict_flower(results))
    print(verdict_memory(results))
    print()
    if not args.no_rules:
        from robust_bench import main as robust_main  # beside this file

        cases = ["--cases", "10x1M,100x1M"] if args.quick else []
        robust_main(["--repeat", str(min(args.repeat, 3)), *cases])
        print()
    print_equality()


if __name__ == "__main__":
    main()
