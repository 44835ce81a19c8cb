"""The `fltraining` command: serve on the embedded store, workers, createuser, restarts."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.processes import ServiceProcess

PASSWORD = "a long enough password"


def createuser(env: dict[str, str], username: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    """Run `fltraining createuser` with the password on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "routes.cli", "createuser", username, "--actor"],
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
            # Each worker process logs its start; two distinct pids served.
            lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
            pids = {line["pid"] for line in lines if line["msg"].startswith("fltraining listening")}
            assert len(pids) == 2
            async with session.post(service.base_url + "/api/users/", json={"username": "w0", "password": PASSWORD}) as r:
                assert r.status == 409


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
