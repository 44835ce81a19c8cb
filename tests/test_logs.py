"""Log lines: readable text when stderr is a terminal, JSON lines otherwise or when asked for."""

import json
import os
import pty
import subprocess
import sys

import pytest

# Logs know no blob store: run once, in the files tier.
pytestmark = pytest.mark.store_independent

# What `fltraining serve` does with its settings, then one access-log record as the service writes it.
SCRIPT = """
import logging, sys
from fltraining.logs import configure_logging
from fltraining.settings import Settings

settings = Settings()
configure_logging(settings.log_level, settings.log_format, sys.stderr)
logging.getLogger("fltraining.access").info("request", extra={"method": "GET", "status": 200, "route": "/health"})
"""


def log_output(on_terminal: bool, log_format: str | None) -> str:
    """What a process configured from the environment writes to stderr, a terminal or a pipe."""
    env = {key: value for key, value in os.environ.items() if key != "FLTRAINING_LOG_FORMAT"}
    if log_format is not None:
        env["FLTRAINING_LOG_FORMAT"] = log_format
    if not on_terminal:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        return done.stderr
    controller, terminal = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", SCRIPT], env=env, stderr=terminal, stdout=subprocess.DEVNULL,
                       check=True)
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_terminal_gets_readable_lines() -> None:
    line = log_output(on_terminal=True, log_format=None).strip()
    assert not line.startswith("{")
    assert "INFO" in line and "fltraining.access: request" in line
    assert "method=GET" in line and "status=200" in line and "route=/health" in line


def test_pipe_gets_json_lines() -> None:
    entry = json.loads(log_output(on_terminal=False, log_format=None))
    assert entry["level"] == "INFO" and entry["logger"] == "fltraining.access" and entry["msg"] == "request"
    assert entry["status"] == 200 and entry["route"] == "/health" and entry["ts"].endswith("Z")


@pytest.mark.parametrize(("on_terminal", "log_format", "json_lines"), [
    (True, "json", True), (False, "text", False), (True, "auto", False), (False, "auto", True),
])
def test_format_setting_wins_over_the_terminal(on_terminal: bool, log_format: str, json_lines: bool) -> None:
    output = log_output(on_terminal=on_terminal, log_format=log_format).strip()
    assert output.startswith("{") is json_lines
    assert "request" in output


def test_unknown_format_is_refused_at_start() -> None:
    env = {**os.environ, "FLTRAINING_LOG_FORMAT": "xml"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "log_format" in done.stderr
