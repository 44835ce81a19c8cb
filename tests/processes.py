"""Running `fltraining serve` as a real process for the tests that need one."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# A port is free when chosen and taken only when the service binds it; in between another test's
# process (the other blob store tier runs beside this one) may take it. The service then exits
# saying so, and the test starts it again on other ports.
PORT_TAKEN = "the port is in use"
PORT_ATTEMPTS = 3


# Services running now, so a failing test's report can show what they logged.
RUNNING: "set[ServiceProcess]" = set()
LOG_TAIL_LINES = 40


class PortTaken(RuntimeError):
    """The service could not bind a port chosen for it."""


class ServiceProcess:
    """`fltraining serve` in a subprocess, ready once /health answers 200."""

    def __init__(self, data_dir: Path, workers: int = 1, env: dict[str, str] | None = None,
                 port: int | None = None, embedded_port: int | None = None) -> None:
        self.data_dir = data_dir
        self._given_port, self._given_embedded_port = port, embedded_port
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
        """Start and wait until this process answers /health with 200 (on new ports if one chosen was taken)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start_once(timeout)
                RUNNING.add(self)
                return
            except PortTaken:
                if attempt == PORT_ATTEMPTS - 1 or (self._given_port and self._given_embedded_port):
                    raise
                self.port = self._given_port or free_port()
                self.embedded_port = self._given_embedded_port or free_port()
                self.env["FLTRAINING_EMBEDDED_PORT"] = str(self.embedded_port)
                self.log_path = self.data_dir / f"service-{self.port}.log"

    def _start_once(self, timeout: float) -> None:
        """One start; PortTaken when the service could not bind its ports."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            started_at = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "routes.cli", "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        # Another service that took this port would answer /health too: only this service's log
        # holding the probe's request id shows the answer came from here.
        probe = f"readiness-{uuid.uuid4().hex}"
        health = urllib.request.Request(self.base_url + "/health", headers={"X-Request-ID": probe})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                written = self.log_since(started_at)
                self.process = None
                if PORT_TAKEN in written:
                    raise PortTaken(f"service could not bind its port: {written}")
                raise RuntimeError(f"service exited: {written}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200 and probe in self.log_since(started_at):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)  # polling for readiness, not papering over a race
        self.stop()
        raise RuntimeError(f"service did not become healthy: {self.log_path.read_text()}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), then wait."""
        RUNNING.discard(self)
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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the service wrote."""
        return "\n".join(self.log().splitlines()[-lines:])

    def log_since(self, offset: int) -> str:
        """What the service wrote from this byte offset of its log on."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
