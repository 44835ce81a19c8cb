"""Robust aggregation rules benchmark: our block-major rules over memory-mapped update files against
Flower 1.42's `aggregate_median`, `aggregate_trimmed_avg` and `aggregate_krum` on the same updates.

Cases N × P (default 10 × 1M, 100 × 1M, 10 × 25M float32 parameters in `--tensors` tensors), the update
files written once and read into the page cache before each case (as `aggregation_bench.py` does). For
each rule — median, trimmed mean (β = 0.2), Krum (f = 1), Multi-Krum (f = 1, m = 3) — two measurements,
each in a fresh `spawn`ed process, each the best of `--repeat` runs:

- ours: `rule_of_files`, the engine's path (the files mapped, the rule block-major: a block holds at most
  2¹⁹ float64 values for all N updates together, written into a safetensors result file); peak heap
  (RssAnon, sampled from /proc) and peak mapped file pages (RssFile, the page cache's pages).
- Flower: its function on the N updates already in memory (only the call is timed); peak RSS. It runs
  only when it fits in the available memory with a margin; its result is checked against ours.

GB/s counts the float32 payload of the updates (N·P·4 bytes). Targets (issue 19): median and trimmed mean
≥ 2× Flower's speed with heap independent of N; Krum and Multi-Krum within 1.5× Flower's time with
heap independent of P.
Usage: `python bench/robust_bench.py [--cases 10x1M,100x1M,10x25M] [--rules median,krum] [--repeat 3]`.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregation_bench import (
    GB,
    Outcome,
    available_bytes,
    compare,
    in_fresh_process,
    parse_count,
    prewarm,
    sample_size,
    show_count,
    time_flower,
    time_ours,
    write_updates,
)

from fltraining.options import AggregationRule, KrumRule, MedianRule, MultiKrumRule, TrimmedMeanRule
from fltraining.weights.robust import rule_of_files

FLOAT32_BYTES = 4
FLOWER_MARGIN_BYTES = 2 << 30
RULES: dict[str, AggregationRule] = {
    "median": MedianRule(rule="median"),
    "trimmed_mean": TrimmedMeanRule(rule="trimmed_mean", trim_fraction=0.2),
    "krum": KrumRule(rule="krum", byzantine=1),
    "multi_krum": MultiKrumRule(rule="multi_krum", byzantine=1, select=3),
}
COORDINATEWISE = {"median", "trimmed_mean"}


def measure_ours(rule_name: str, paths: list[str], sizes: list[int], repeat: int, out: str) -> dict[str, float]:
    """The engine's path: `rule_of_files` over the mapped update files into a safetensors result file."""
    return time_ours(lambda files, signature, result: rule_of_files(files, sizes, signature, "safetensors", result,
                                                                    RULES[rule_name]), paths, repeat, out)


def flower_function(rule_name: str) -> Callable[[list[tuple[list[np.ndarray], int]]], list[np.ndarray]]:
    """Flower 1.42's function for the rule, with our rule's parameters."""
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    functions: dict[str, Callable[[Any], list[np.ndarray]]] = {
        "median": aggregate_median,
        "trimmed_mean": lambda results: aggregate_trimmed_avg(results, 0.2),
        "krum": lambda results: aggregate_krum(results, 1, 0),
        "multi_krum": lambda results: aggregate_krum(results, 1, 3),
    }
    return functions[rule_name]


def measure_flower(rule_name: str, paths: list[str], sizes: list[int], repeat: int, out: str) -> dict[str, float]:
    """Flower's function for the rule on every update held in memory (only the call is timed)."""
    return time_flower(flower_function(rule_name), paths, sizes, repeat, out)


def flower_refusal(clients: int, parameters: int) -> str | None:
    """Why Flower is not run for the case, or None (it holds the inputs and about as much again)."""
    if importlib.util.find_spec("flwr") is None:
        return "flwr not installed"
    need, available = 2 * clients * parameters * FLOAT32_BYTES, available_bytes()
    if need > available - FLOWER_MARGIN_BYTES:
        return f"skipped (needs ~{need / GB:.1f} GB)"
    return None


COLUMNS = ["rule", "N", "P", "our time s", "our GB/s", "our peak heap MiB", "Flower time s", "Flower peak RSS MiB",
           "ours/Flower speed", "= Flower"]


def measure(rule_name: str, clients: int, parameters: int, paths: list[str], repeat: int,
            workdir: Path) -> dict[str, Any]:
    """One row: ours and Flower for a rule and a case."""
    sizes = [sample_size(index) for index in range(clients)]
    prewarm(paths)
    ours_out, flower_out = workdir / "ours.safetensors", workdir / "flower.safetensors"
    ours = in_fresh_process(measure_ours, rule_name, paths, sizes, repeat, str(ours_out))
    flower: Outcome | str | None = flower_refusal(clients, parameters)
    if flower is None:
        flower = in_fresh_process(measure_flower, rule_name, paths, sizes, repeat, str(flower_out))
    match = compare(ours_out, flower_out) if isinstance(ours, Outcome) and isinstance(flower, Outcome) else "—"
    for path in (ours_out, flower_out):
        path.unlink(missing_ok=True)
    return {"rule": rule_name, "clients": clients, "parameters": parameters, "ours": ours, "flower": flower,
            "match": match}


def row(measured: dict[str, Any]) -> dict[str, str]:
    """One table row; failures and skips where their numbers would be."""
    ours, flower = measured["ours"], measured["flower"]
    payload = measured["clients"] * measured["parameters"] * FLOAT32_BYTES
    cells = dict.fromkeys(COLUMNS, "—") | {"rule": measured["rule"], "N": str(measured["clients"]),
                                           "P": show_count(measured["parameters"]), "= Flower": measured["match"]}
    if isinstance(ours, Outcome):
        cells |= {"our time s": f"{ours.seconds:.3f}", "our GB/s": f"{payload / ours.seconds / GB:.2f}",
                  "our peak heap MiB": f"{ours.peak_mib:.0f}"}
    else:
        cells["our time s"] = ours
    if isinstance(flower, Outcome):
        cells |= {"Flower time s": f"{flower.seconds:.3f}", "Flower peak RSS MiB": f"{flower.peak_mib:.0f}"}
        if isinstance(ours, Outcome):
            cells["ours/Flower speed"] = f"{flower.seconds / ours.seconds:.2f}×"
    else:
        cells["Flower time s"] = str(flower)
    return cells


def verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """The targets, per rule: speed against Flower, and heap against N (coordinate-wise) or P (Krum)."""
    lines = []
    for rule_name in dict.fromkeys(r["rule"] for r in results):
        mine = [r for r in results if r["rule"] == rule_name and isinstance(r["ours"], Outcome)]
        speeds = [r["flower"].seconds / r["ours"].seconds for r in mine if isinstance(r["flower"], Outcome)]
        wanted = 2.0 if rule_name in COORDINATEWISE else 1 / 1.5
        speed = ("not measured" if not speeds else
                 f"{'PASS' if min(speeds) >= wanted else 'FAIL'} (worst {min(speeds):.2f}×, wanted ≥ {wanted:.2f}×)")
        along = "clients" if rule_name in COORDINATEWISE else "parameters"
        heaps = {r[along]: r["ours"].peak_mib for r in mine
                 if r["parameters" if along == "clients" else "clients"] == min(x["parameters" if along == "clients"
                                                                                   else "clients"] for x in mine)}
        if len(heaps) < 2:
            memory = "not measured"
        else:
            low, high = heaps[min(heaps)], heaps[max(heaps)]
            # Independent: the heap grows by less than a tenth of the extra input (holding the inputs: all of it).
            extra_input = (max(heaps) - min(heaps)) * (min(r["parameters"] for r in mine) if along == "clients"
                                                       else min(r["clients"] for r in mine)) * FLOAT32_BYTES / (1 << 20)
            verdict = "PASS" if high - low <= 0.1 * extra_input else "FAIL"
            memory = f"{verdict} ({low:.0f} → {high:.0f} MiB from {along} {show_count(min(heaps))} to {show_count(max(heaps))})"
        target = "≥ 2× Flower's speed" if rule_name in COORDINATEWISE else "within 1.5× Flower's time"
        lines.append(f"- {rule_name}: {target}: {speed}; heap independent of {along}: {memory}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Run every rule on every case and print the table and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="10x1M,100x1M,10x25M", help="N×P cases, comma-separated")
    parser.add_argument("--rules", default=",".join(RULES), help="rules, comma-separated")
    parser.add_argument("--tensors", type=int, default=4, help="tensors sharing the P parameters")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = [(parse_count(n), parse_count(p)) for n, p in (text.lower().split("x") for text in args.cases.split(","))]
    rules = [name for name in args.rules.split(",") if name]
    unknown = set(rules) - set(RULES)
    if unknown:
        parser.error(f"unknown rules: {sorted(unknown)}")
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="robust-bench-") as temporary:
        workdir = Path(temporary)
        for parameters in sorted({p for _, p in cases}):
            folder = workdir / show_count(parameters)
            folder.mkdir()
            most = max(n for n, p in cases if p == parameters)
            paths = write_updates(folder, parameters, args.tensors, most, args.seed)
            for clients in sorted(n for n, p in cases if p == parameters):
                for rule_name in rules:
                    results.append(measure(rule_name, clients, parameters, paths[:clients], args.repeat, workdir))
                    print(f"{rule_name} N={clients} P={show_count(parameters)} done", file=sys.stderr, flush=True)
            for path in paths:
                Path(path).unlink()
    results.sort(key=lambda r: (list(RULES).index(r["rule"]), r["parameters"], r["clients"]))
    print(f"\nRobust rules, best of {args.repeat}, {time.strftime('%Y-%m-%d')}; Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}, {os.cpu_count()} CPUs, load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---:" for _ in COLUMNS) + "|")
    for measured in results:
        cells = row(measured)
        print("| " + " | ".join(cells[name] for name in COLUMNS) + " |")
    print("\n".join(["", "Targets:", *verdicts(results)]))


if __name__ == "__main__":
    main()
