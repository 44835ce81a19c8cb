"""The embedded store: a mongoeco MongoDB wire-protocol server on SQLite, in its own process."""

import argparse
import asyncio
import ctypes
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

READY_PREFIX = "FLTRAINING-STORE-READY "
SQLITE_FILE = "fltraining.sqlite3"
_PR_SET_PDEATHSIG = 1


class EmbeddedStoreError(RuntimeError):
    """The embedded store process failed to start."""


def store_url(host: str, port: int) -> str:
    """Return the mongodb:// URL at which the embedded store answers."""
    return f"mongodb://{host}:{port}/?directConnection=true"


async def serve_store(data_path: str, host: str, port: int) -> None:
    """Run the wire server until SIGTERM or SIGINT; print the ready line once listening."""
    from fltraining.storage import mongoeco_fixes

    mongoeco_fixes.apply()
    from mongoeco.engines.memory import MemoryEngine
    from mongoeco.engines.sqlite import SQLiteEngine
    from mongoeco.wire.proxy import AsyncMongoEcoProxyServer

    engine = MemoryEngine() if data_path == ":memory:" else SQLiteEngine(data_path, executor_workers=1)
    server = AsyncMongoEcoProxyServer(engine=engine, host=host, port=port)
    address = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(READY_PREFIX + store_url(address.host, address.port), flush=True)
    await stop.wait()
    await server.close()


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
            "--data", self.data_path, "--host", self.host, "--port", str(self.port),
        ]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
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
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FLTRAINING_LOG_LEVEL", "WARNING"))
    asyncio.run(serve_store(args.data, args.host, args.port))


if __name__ == "__main__":
    main()
