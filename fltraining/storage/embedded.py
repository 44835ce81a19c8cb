"""The embedded store: a mongoeco MongoDB wire-protocol server on SQLite, in its own process."""

import argparse
import asyncio
import ctypes
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from fltraining.heap import freeze_startup_objects
from fltraining.logs import configure_logging

log = logging.getLogger(__name__)

READY_PREFIX = "FLTRAINING-STORE-READY "
SQLITE_FILE = "fltraining.sqlite3"
RECORD_FILE = "store.json"
MANAGED_GRACE_SECONDS = 5.0
STOP_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


class EmbeddedStoreError(RuntimeError):
    """The embedded store process failed to start."""


def store_url(host: str, port: int) -> str:
    """Return the mongodb:// URL at which the embedded store answers."""
    return f"mongodb://{host}:{port}/?directConnection=true"


async def serve_store(data_path: str, host: str, port: int, managed: bool) -> None:
    """Run the wire server until stopped; print the ready line once listening.

    A managed store (started by a service) stops when its standard input closes: the service closes it
    to stop the store, and the kernel closes it when the service dies. It ignores SIGINT, which a
    terminal's Ctrl-C sends to the whole process group (the service still needs the store while it
    shuts down), and stops MANAGED_GRACE_SECONDS after a SIGTERM sent to the group, for the same reason.
    """
    from fltraining.storage import mongoeco_fixes

    mongoeco_fixes.apply()
    if data_path != ":memory:" and Path(data_path).exists():
        mongoeco_fixes.share_entry_indexes(data_path)
    from mongoeco.engines.memory import MemoryEngine
    from mongoeco.engines.sqlite import SQLiteEngine
    from mongoeco.wire.proxy import AsyncMongoEcoProxyServer

    engine = MemoryEngine() if data_path == ":memory:" else SQLiteEngine(data_path, executor_workers=1)
    server = AsyncMongoEcoProxyServer(engine=engine, host=host, port=port)
    address = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    if managed:
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.call_later(MANAGED_GRACE_SECONDS, stop.set))
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                         name="parent-watch", daemon=True).start()
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    url = store_url(address.host, address.port)
    record = None if data_path == ":memory:" else Path(data_path).parent / RECORD_FILE
    if record is not None:
        _write_record(record, url)
    freeze_startup_objects()
    print(READY_PREFIX + url, flush=True)
    try:
        await stop.wait()
        await server.close()
    finally:
        if record is not None and _recorded_pid(record) == os.getpid():
            record.unlink(missing_ok=True)


def _write_record(record: Path, url: str) -> None:
    """Say which store serves this data directory (for `createuser` and for a second instance)."""
    temporary = record.with_suffix(".tmp")
    temporary.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(temporary, record)


def _recorded_pid(record: Path) -> int | None:
    try:
        return int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_store(data_dir: Path) -> str | None:
    """The URL of the live embedded store of `data_dir`, if one runs: its record names a process that
    exists and an address that accepts connections (a killed store leaves its record behind)."""
    try:
        record = json.loads((Path(data_dir) / RECORD_FILE).read_text())
        pid, url = int(record["pid"]), str(record["url"])
        os.kill(pid, 0)
        address = urlsplit(url)
        with socket.create_connection((address.hostname or "127.0.0.1", address.port or 0), timeout=1):
            pass
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url


def port_free(host: str, port: int) -> bool:
    """Whether a TCP port can be listened on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def start_for(data_dir: Path, host: str, port: int, port_is_explicit: bool) -> "EmbeddedStore":
    """Start the embedded store of a data directory: refuse a directory another live store serves,
    and take any free port when the default one is taken (an explicitly configured port must be free)."""
    if (url := running_store(data_dir)) is not None:
        raise EmbeddedStoreError(
            f"the data directory {data_dir} is in use by another running store ({url}); "
            "set FLTRAINING_DATA_DIR to another directory, or FLTRAINING_MONGODB_URL to that store's URL"
        )
    if port and not port_free(host, port):
        if port_is_explicit:
            raise EmbeddedStoreError(
                f"FLTRAINING_EMBEDDED_PORT={port}: the port is in use on {host}; choose another, or 0 for any free port"
            )
        log.warning("embedded store port %d is in use (another instance?); using a free port instead", port)
        port = 0
    store = EmbeddedStore(data_dir, host, port)
    store.start()
    return store


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the process that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the store then outlives a killed parent
        pass


class EmbeddedStore:
    """Starts the store process, waits until it listens, and stops it on exit."""

    def __init__(self, data_dir: Path | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.data_path = ":memory:" if data_dir is None else str(Path(data_dir) / SQLITE_FILE)
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> str:
        """Start the process and return its mongodb:// URL once it accepts connections."""
        if self.data_dir is not None:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "fltraining.storage.embedded",
            "--data", self.data_path, "--host", self.host, "--port", str(self.port), "--managed",
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
        )
        assert self._process.stdout is not None
        # Read lines until the ready line; the child prints nothing else to stdout.
        selector = selectors.DefaultSelector()
        selector.register(self._process.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not selector.select(timeout=max(0.0, end - time.monotonic())):
                break
            line = self._process.stdout.readline()
            if not line:
                break
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX):].strip()
                return self.url
        self.stop()
        raise EmbeddedStoreError(
            f"the embedded store did not start (port {self.port} in use, or data at "
            f"{self.data_path} unreadable?)"
        )

    def stop(self) -> None:
        """Stop the store process gracefully, killing it if it hangs."""
        if self._process is None:
            return
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the store's signal to stop now (see serve_store)
            try:
                self._process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        elif self._process.stdin is not None:
            self._process.stdin.close()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the store process."""
    parser = argparse.ArgumentParser(description="fltraining embedded MongoDB-compatible store")
    parser.add_argument("--data", required=True, help="SQLite file, or :memory:")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--managed", action="store_true", help="started by a service, which stops it")
    args = parser.parse_args(argv)
    # The service's own settings, inherited through the environment (this process never reads Settings).
    log_format = os.environ.get("FLTRAINING_LOG_FORMAT", "auto")
    configure_logging(os.environ.get("FLTRAINING_LOG_LEVEL", "WARNING"),
                      log_format if log_format in ("json", "text") else "auto", sys.stderr)
    asyncio.run(serve_store(args.data, args.host, args.port, args.managed))


if __name__ == "__main__":
    main()
