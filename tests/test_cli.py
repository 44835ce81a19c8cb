"""The `fltraining` command: serve on the embedded store, workers, createuser, restarts."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from fltraining.storage.embedded import running_store, start_for
from tests.helpers import small_model
from tests.processes import ServiceProcess, free_port

PASSWORD = "a long enough password"


def createuser(env: dict[str, str], username: str, password: str = PASSWORD,
               *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `fltraining createuser` with the password on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "routes.cli", "createuser", username, "--actor", *extra],
        input=password + "\n", text=True, capture_output=True, env=env, timeout=120,
    )


async def get_json(url: str, headers: dict[str, str]) -> tuple[int, object]:
    """GET a URL and decode its JSON body."""
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json()


async def test_serve_uses_the_embedded_store_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "data")
    with service:
        log = service.log()
        assert "store: embedded" in log
        assert f"mongodb://127.0.0.1:{service.embedded_port}/" in log
        assert str(tmp_path / "data") in log or "fltraining.sqlite3" in log
        # createuser reaches the running service's store.
        made = await asyncio.to_thread(createuser, service.env, "operator")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}", token)
        status, me = await get_json(service.base_url + "/api/users/myself/", {"Authorization": f"Token {token}"})
        assert status == 200 and me["username"] == "operator"  # type: ignore[index]
    assert PASSWORD not in service.log() and token not in service.log()
    with ServiceProcess(tmp_path / "data") as again:
        status, me = await get_json(again.base_url + "/api/users/myself/", {"Authorization": f"Token {token}"})
        assert status == 200 and me["username"] == "operator"  # type: ignore[index]


async def test_createuser_without_a_running_service_starts_the_store_itself(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "data")
    made = await asyncio.to_thread(createuser, service.env, "offline")
    assert made.returncode == 0, made.stderr
    again = await asyncio.to_thread(createuser, service.env, "offline")
    assert again.returncode != 0 and "already exists" in again.stderr
    short = await asyncio.to_thread(createuser, service.env, "shorty", "short")
    assert short.returncode != 0 and "password" in short.stderr
    with service:
        status, me = await get_json(service.base_url + "/api/users/myself/",
                                    {"Authorization": f"Token {made.stdout.strip()}"})
        assert status == 200 and me["username"] == "offline"  # type: ignore[index]


async def test_two_workers_share_one_port_and_one_store(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path / "data", workers=2) as service:
        async with aiohttp.ClientSession() as session:
            async def register(index: int) -> int:
                body = {"username": f"w{index}", "password": PASSWORD}
                async with session.post(service.base_url + "/api/users/", json=body) as response:
                    return response.status
            statuses = await asyncio.gather(*(register(i) for i in range(20)))
            assert statuses == [201] * 20
            # Each worker process logs its start once its database is up; two distinct pids serve.
            async with asyncio.timeout(30):
                while len(pids := listening_pids(service.log())) < 2:
                    await asyncio.sleep(0.1)  # polling the log for the second worker's start line
            assert len(pids) == 2
            async with session.post(service.base_url + "/api/users/", json={"username": "w0", "password": PASSWORD}) as r:
                assert r.status == 409


async def test_createuser_reaches_the_store_of_its_own_data_directory(tmp_path: Path) -> None:
    """Before: createuser used whatever answered on the embedded port, another instance's store included."""
    other = ServiceProcess(tmp_path / "other")
    with other:
        mine = ServiceProcess(tmp_path / "mine", embedded_port=other.embedded_port)  # the same port, on purpose
        made = await asyncio.to_thread(createuser, mine.env, "dana", PASSWORD, "--first-name", "Dana",
                                       "--last-name", "Scully", "--email", "dana@example.org")
        assert made.returncode == 0, made.stderr
        headers = {"Authorization": f"Token {made.stdout.strip()}"}
        status, _ = await get_json(other.base_url + "/api/users/myself/", headers)
        assert status == 401  # nothing written into the other instance's store
    with ServiceProcess(tmp_path / "mine") as service:
        status, me = await get_json(service.base_url + "/api/users/myself/", headers)
        assert status == 200
        assert (me["username"], me["first_name"], me["last_name"], me["email"]) == (  # type: ignore[index]
            "dana", "Dana", "Scully", "dana@example.org")


def serve_briefly(data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `fltraining serve` expecting it to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "routes.cli", "serve", "--port", str(free_port())],
        text=True, capture_output=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FLTRAINING_")},
             "FLTRAINING_DATA_DIR": str(data_dir), **env},
    )


async def test_an_explicit_embedded_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path / "first") as first:
        done = await asyncio.to_thread(serve_briefly, tmp_path / "second",
                                       {"FLTRAINING_EMBEDDED_PORT": str(first.embedded_port)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1 and "FLTRAINING_EMBEDDED_PORT" in errors[0]["msg"]
    assert "listening" not in done.stderr


async def test_a_data_directory_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path / "data") as first:
        done = await asyncio.to_thread(serve_briefly, tmp_path / "data", {"FLTRAINING_EMBEDDED_PORT": "0"})
        assert first.process is not None and first.process.poll() is None  # untouched
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is in use by another running store" in done.stderr


async def test_an_unusable_data_directory_or_setting_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = await asyncio.to_thread(serve_briefly, tmp_path / "a-file" / "data", {})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1 and "FLTRAINING_DATA_DIR" in errors[0]["msg"]
    assert "listening" not in done.stderr
    refused = await asyncio.to_thread(serve_briefly, tmp_path / "data", {"FLTRAINING_LOG_FORMAT": "xml"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "invalid setting: FLTRAINING_LOG_FORMAT" in refused.stderr


def test_a_taken_default_embedded_port_falls_back_to_a_free_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = start_for(tmp_path, "127.0.0.1", port, port_is_explicit=False)
        try:
            assert store.url.startswith("mongodb://127.0.0.1:") and f":{port}/" not in store.url
            assert running_store(tmp_path) == store.url
            assert any("using a free port instead" in record.getMessage() for record in caplog.records)
        finally:
            store.stop()
    assert running_store(tmp_path) is None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_ctrl_c_or_sigterm_to_the_process_group_exits_quickly_and_quietly(tmp_path: Path, signum: int) -> None:
    """Before: ~31 s to exit (the store got the signal too; the exit flush waited 30 s for it), and
    `database is locked` and logging errors on stderr."""
    service = ServiceProcess(tmp_path / "data")
    service.start()
    assert service.process is not None
    try:
        async with aiohttp.ClientSession() as session:
            status, _ = await get_json(service.base_url + "/api/users/", {})  # the service is up
            assert status == 401
            reg = {"username": "watcher", "password": PASSWORD, "actor": True}
            async with session.post(service.base_url + "/api/users/", json=reg) as response:
                token = (await response.json())["token"]
            # A live event stream is open while the signal arrives: it must not hold the shutdown.
            model_form = aiohttp.FormData()
            model_form.add_field("name", "m")
            model_form.add_field("model_file", small_model(), filename="m")
            headers = {"Authorization": f"Token {token}"}
            async with session.post(service.base_url + "/api/models/", data=model_form, headers=headers) as response:
                model_id = (await response.json())["model_id"]
            async with session.post(service.base_url + "/api/trainings/", headers=headers,
                                    json={"model_id": model_id, "target_num_updates": 1}) as response:
                training_id = (await response.json())["training_id"]
            stream = await session.get(f"{service.base_url}/api/trainings/{training_id}/events/",
                                       headers={**headers, "Accept": "text/event-stream"})
            assert stream.status == 200
            started = time.monotonic()
            os.kill(service.process.pid, signum)
            for pid in children_of(service.process.pid):  # a terminal signals the whole group
                os.kill(pid, signum)
            await asyncio.to_thread(service.process.wait, 30)
            elapsed = time.monotonic() - started
            stream.release()
    finally:
        service.stop()
    log = service.log()
    assert elapsed < 5, f"took {elapsed:.1f} s to exit"
    for noise in ("Traceback", "database is locked", "Logging error", "Task was destroyed"):
        assert noise not in log, log[-3000:]
    assert not (tmp_path / "data" / "store.json").exists()


def children_of(pid: int) -> list[int]:
    """Direct child processes of a process (Linux)."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def listening_pids(log: str) -> set[int]:
    """The pids of the processes whose "listening" line is in a service log."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line["msg"].startswith("fltraining listening")}


def compose_command() -> list[str] | None:
    """A compose CLI, if this machine has one."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_file_is_accepted() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose CLI on this machine (neither `docker compose` nor `docker-compose`)")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([*command, "-f", str(root / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=root, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mongo" in result.stdout and "service_healthy" in result.stdout
