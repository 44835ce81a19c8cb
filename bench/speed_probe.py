"""This machine's speed while a bench runs: a fixed piece of Python work, timed in CPU time ten times a second.

This VM's per-core speed drifts: the same work takes up to a third longer for seconds or minutes at a time
(steal time stays near zero, so process CPU time rises with it). A bench that compares rounds of one training
can divide each round's CPU by the probe's CPU over the same seconds, so that a slower minute of the machine
does not read as a costlier round. The probe uses about 3 % of one core.

Run as a process: `python bench/speed_probe.py OUT` appends `monotonic_seconds cpu_ms` lines to OUT until killed
(CLOCK_MONOTONIC is the same in every process, so the lines line up with the bench's own clock).
"""

import statistics
import sys
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

WORK_ITEMS = 20_000  # about 3 ms of CPU on this machine
INTERVAL_SECONDS = 0.1
WINDOW_SECONDS = 1.0  # a round shorter than this is compared with the probe's samples around its middle


def reference_work() -> float:
    """Do the fixed work once; its CPU time in ms."""
    started = time.thread_time()
    totals: dict[int, int] = {}
    for item in range(WORK_ITEMS):
        totals[item % 977] = totals.get(item % 977, 0) + item
        str(item)
    return (time.thread_time() - started) * 1000


def read_samples(path: Path) -> list[tuple[float, float]]:
    """The probe's samples as (monotonic time, CPU ms), skipping a line cut short by the kill."""
    samples = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            samples.append((float(fields[0]), float(fields[1])))
    return samples


def speeds(samples: Sequence[tuple[float, float]], boundaries: Sequence[float]) -> list[float]:
    """The probe's median CPU ms in each interval between boundaries, widened to WINDOW_SECONDS around its middle."""
    medians = []
    for start, end in pairwise(boundaries):
        middle, half = (start + end) / 2, max(end - start, WINDOW_SECONDS) / 2
        inside = [ms for at, ms in samples if middle - half <= at <= middle + half]
        if not inside:
            raise RuntimeError(f"the speed probe took no sample between {start:.1f} and {end:.1f} s")
        medians.append(statistics.median(inside))
    return medians


def main() -> None:
    """Sample until killed."""
    with open(sys.argv[1], "a", buffering=1) as out:
        while True:
            out.write(f"{time.monotonic():.4f} {reference_work():.3f}\n")
            time.sleep(INTERVAL_SECONDS)


if __name__ == "__main__":
    main()
