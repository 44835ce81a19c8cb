"""Request metrics in Prometheus' text format, summed over every service process."""

import os
import socket
import uuid
from bisect import bisect_left
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from fltraining.clock import utcnow
from fltraining.documents import MetricsSnapshot, Training
from fltraining.states import TrainingState

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_SECONDS = 5.0
SNAPSHOT_LIFETIME = timedelta(hours=1)
SeriesKey = tuple[str, str, str]  # method, route template, status


class RequestMetrics:
    """Cumulative request counts and latency histograms of this process."""

    def __init__(self) -> None:
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._series: dict[SeriesKey, dict[str, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        key = (method, route, str(status))
        entry = self._series.get(key)
        if entry is None:
            entry = self._series[key] = {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
        entry["buckets"][bisect_left(BUCKETS, seconds)] += 1
        entry["sum"] += seconds
        entry["count"] += 1

    def as_documents(self) -> list[dict[str, Any]]:
        """The series as stored in a snapshot."""
        return [
            {"method": m, "route": r, "status": s, "buckets": list(v["buckets"]), "sum": v["sum"], "count": v["count"]}
            for (m, r, s), v in self._series.items()
        ]

    async def flush(self) -> None:
        """Store this process's totals for the other processes' /metrics answers."""
        now = utcnow()
        await MetricsSnapshot.get_pymongo_collection().replace_one(
            {"_id": self.process_id},
            {"series": self.as_documents(), "updated_at": now, "expires_at": now + SNAPSHOT_LIFETIME},
            upsert=True,
        )


def _merge(snapshots: Iterable[list[dict[str, Any]]]) -> dict[SeriesKey, dict[str, Any]]:
    """Sum series of several processes."""
    merged: dict[SeriesKey, dict[str, Any]] = {}
    for series in snapshots:
        for item in series:
            key = (item["method"], item["route"], item["status"])
            target = merged.setdefault(key, {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0})
            target["buckets"] = [a + b for a, b in zip(target["buckets"], item["buckets"], strict=True)]
            target["sum"] += item["sum"]
            target["count"] += item["count"]
    return merged


def _escape(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(series: dict[SeriesKey, dict[str, Any]], states: dict[str, int]) -> str:
    """The Prometheus text exposition of request series and trainings per state."""
    lines = [
        "# HELP fltraining_http_requests_total HTTP requests by method, route template and status.",
        "# TYPE fltraining_http_requests_total counter",
    ]
    for (method, route, status), value in sorted(series.items()):
        labels = f'method="{method}",route="{_escape(route)}",status="{status}"'
        lines.append(f"fltraining_http_requests_total{{{labels}}} {value['count']}")
    lines += [
        "# HELP fltraining_http_request_duration_seconds HTTP request latency.",
        "# TYPE fltraining_http_request_duration_seconds histogram",
    ]
    for (method, route, status), value in sorted(series.items()):
        labels = f'method="{method}",route="{_escape(route)}",status="{status}"'
        running = 0
        for bound, count in zip([*BUCKETS, "+Inf"], value["buckets"], strict=True):
            running += count
            lines.append(f'fltraining_http_request_duration_seconds_bucket{{{labels},le="{bound}"}} {running}')
        lines.append(f"fltraining_http_request_duration_seconds_sum{{{labels}}} {value['sum']:.6f}")
        lines.append(f"fltraining_http_request_duration_seconds_count{{{labels}}} {value['count']}")
    lines += [
        "# HELP fltraining_trainings Trainings by state code.",
        "# TYPE fltraining_trainings gauge",
    ]
    lines += [f'fltraining_trainings{{state="{state}"}} {states.get(state, 0)}' for state in TrainingState]
    return "\n".join(lines) + "\n"


async def trainings_per_state() -> dict[str, int]:
    """Count trainings by state in the database."""
    cursor = await Training.get_pymongo_collection().aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
    return {str(row["_id"]): int(row["n"]) async for row in cursor}


async def collect(metrics: RequestMetrics) -> str:
    """Every process's totals (this one's live, the others' last flush) as Prometheus text."""
    others = MetricsSnapshot.get_pymongo_collection().find({"_id": {"$ne": metrics.process_id}})
    snapshots = [document["series"] async for document in others]
    return render(_merge([*snapshots, metrics.as_documents()]), await trainings_per_state())
