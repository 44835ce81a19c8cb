"""Running `fltraining serve` as a real process for the tests that need one."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """`fltraining serve` in a subprocess, ready once /health answers 200."""

    def __init__(self, data_dir: Path, workers: int = 1, env: dict[str, str] | None = None,
                 port: int | None = None, embedded_port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.embedded_port = embedded_port or free_port()
        self.workers = workers
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLTRAINING_")},
            "FLTRAINING_DATA_DIR": str(data_dir),
            "FLTRAINING_EMBEDDED_PORT": str(self.embedded_port),
            "FLTRAINING_PASSWORD_HASH_TIME_COST": "1",
            # The suite's blob store tier (the service picks its own default when none is named).
            **({"FLTRAINING_BLOB_STORE": blob} if (blob := os.environ.get("FLTRAINING_BLOB_STORE")) else {}),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def base_url(self) -> str:
        """Where the service answers."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until /health is 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "routes.cli", "serve", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)  # polling for readiness, not papering over a race
        self.stop()
        raise RuntimeError(f"service did not become healthy: {self.log_path.read_text()}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), then wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        """Everything the service wrote so far."""
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
