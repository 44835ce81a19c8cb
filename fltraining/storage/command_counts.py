"""Counting the store commands a process sends (benchmarks only: `FLTRAINING_STORE_COMMAND_COUNTS_FILE`)."""

import json
import os
from collections import Counter
from pathlib import Path

from pymongo import monitoring


class CommandCounter(monitoring.CommandListener):
    """Counts commands by name as PyMongo starts them (application commands; no monitoring heartbeats)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count one command, by name and collection (`find users`)."""
        target = event.command.get(event.command_name)
        self.counts[f"{event.command_name} {target}" if isinstance(target, str) else event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing: counted when started."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing: counted when started."""

    def dump(self, stem: Path) -> None:
        """Write this process's counts to `<stem>.<pid>.json` (replaced atomically, for a reader polling it)."""
        target = stem.with_name(f"{stem.name}.{os.getpid()}.json")
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(self.counts)))
        temporary.replace(target)
