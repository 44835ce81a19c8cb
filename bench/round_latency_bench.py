"""End-to-end round latency: time from the last local update's upload to the next round's notification.

Starts the service in-process on a fresh embedded store with the `files` blob store (the
default there), with N simulated clients (default 10) training a model of P float32 parameters
(default 1 M and 25 M, 4 tensors) under FedAvg with `skip_model_tests`, so the notification after
an aggregation is the next round's UPDATE_ROUND_START. Per round it prints when the last upload
was acknowledged (201) and when the first and the last client received the next round's
notification, measured on the clients' side; the gap is claim + mapping the updates +
aggregation + storing the new weights + the commit + effects + notification delivery.
Targets: median last upload → last client notified < 0.5 s for 10 × 1 M, < 5 s for 10 × 25 M.

    python bench/round_latency_bench.py [--clients 10] [--params 1M,25M] [--rounds 6]
"""

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import FormData, web

from fltraining.settings import Settings
from fltraining.weights import dump_tensors
from routes.app import create_app

PASSWORD = "round latency bench"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int) -> AsyncIterator[None]:
    """Run an aiohttp application on 127.0.0.1:port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@dataclass
class Client:
    """Uploads a fixed update as soon as a round starts and records when things happen."""

    session: aiohttp.ClientSession
    update: bytes
    headers: dict[str, str] = field(default_factory=dict)
    round_started_at: dict[int, float] = field(default_factory=dict)
    uploaded_at: dict[int, float] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def notified(self, request: web.Request) -> web.Response:
        """Record round starts and upload in the background."""
        message = await request.json()
        if message["notification_type"] == "UPDATE_ROUND_START":
            body = message["body"]
            self.round_started_at[body["round"]] = time.monotonic()
            task = asyncio.create_task(self.upload(body["round"], body["global_model_uuid"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return web.Response(status=202)
        return web.Response(status=200)

    async def upload(self, round_: int, model_id: str) -> None:
        """Download the global model (as a client must) and send the update."""
        async with self.session.get(f"/api/models/{model_id}/", headers=self.headers) as response:
            await response.read()
        form = FormData()
        form.add_field("round", str(round_))
        form.add_field("sample_size", "10")
        form.add_field("model_file", self.update, filename="model_file")
        async with self.session.post(f"/api/models/{model_id}/", data=form, headers=self.headers) as response:
            if response.status != 201:
                raise RuntimeError(f"upload refused: {response.status} {await response.text()}")
        self.uploaded_at[round_] = time.monotonic()


def model(params: int, tensors: int, value: float) -> dict[str, np.ndarray]:
    """`tensors` float32 tensors holding `params` parameters in all."""
    size = params // tensors
    return {f"layer{i}.weight": np.full(size, value, np.float32) for i in range(tensors)}


async def register(session: aiohttp.ClientSession, name: str, **extra: Any) -> tuple[str, dict[str, str]]:
    """Register a user; its id and token headers."""
    async with session.post("/api/users/", json={"username": name, "password": PASSWORD, **extra}) as response:
        body = await response.json()
    return body["id"], {"Authorization": f"Token {body['token']}"}


async def run(clients: int, params: int, rounds: int) -> list[tuple[int, float, float]]:
    """Run the training; per round (round, first, last notification delay after the last upload) in s."""
    with tempfile.TemporaryDirectory(prefix="fltraining-bench-") as data_dir:
        port = free_port()
        settings = Settings(data_dir=Path(data_dir), embedded_port=0, port=port, notification_allow_loopback=True,
                            password_hash_time_cost=1, max_model_bytes=1 << 30, blob_store="files")
        async with serve(create_app(settings), port), aiohttp.ClientSession(
                base_url=f"http://127.0.0.1:{port}") as session, contextlib.AsyncExitStack() as stack:
            members: list[Client] = []
            ids: list[str] = []
            for index in range(clients):
                member = Client(session, dump_tensors(model(params, 4, float(index))))
                app = web.Application(client_max_size=1 << 30)
                app.router.add_post("/", member.notified)
                client_port = free_port()
                await stack.enter_async_context(serve(app, client_port))
                user_id, member.headers = await register(session, f"client{index}", client=True,
                                                         message_endpoint=f"http://127.0.0.1:{client_port}/")
                ids.append(user_id)
                members.append(member)
            _, actor = await register(session, "actor", actor=True)
            form = FormData()
            form.add_field("name", "bench model")
            form.add_field("model_file", dump_tensors(model(params, 4, 0.0)), filename="model")
            async with session.post("/api/models/", data=form, headers=actor) as response:
                model_id = (await response.json())["model_id"]
            body = {"model_id": model_id, "target_num_updates": rounds, "clients": ids,
                    "options": {"skip_model_tests": True}}
            async with session.post("/api/trainings/", json=body, headers=actor) as response:
                training_id = (await response.json())["training_id"]
            async with session.post(f"/api/trainings/{training_id}/start/", headers=actor) as response:
                response.raise_for_status()
            while True:
                async with session.get(f"/api/trainings/{training_id}/", headers=actor) as response:
                    state = (await response.json())["state"]
                if state in {"C", "E"}:
                    break
                await asyncio.sleep(0.2)
            if state != "C":
                raise RuntimeError(f"training ended in state {state}")
    results = []
    for round_ in range(rounds - 1):
        last_upload = max(member.uploaded_at[round_] for member in members)
        starts = [member.round_started_at[round_ + 1] for member in members]
        results.append((round_, min(starts) - last_upload, max(starts) - last_upload))
    return results


def parse_count(text: str) -> int:
    """'1M' → 1_000_000."""
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KMkm")) * scale)


TARGETS_SECONDS = {10**6: 0.5, 25 * 10**6: 5.0}


def main() -> None:
    """Run every size and print one table per size, with the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=lambda text: [parse_count(part) for part in text.split(",")],
                        default=[10**6, 25 * 10**6])
    parser.add_argument("--rounds", type=int, default=6, help="rounds to train (measured: all but the last)")
    args = parser.parse_args()
    print(f"command: python bench/round_latency_bench.py {' '.join(sys.argv[1:])}".rstrip())
    verdicts = []
    for params in args.params:
        started = time.monotonic()
        results = asyncio.run(run(args.clients, params, args.rounds))
        print(f"\nFedAvg, {args.clients} clients × {params:,} float32 parameters, embedded store, files blob store, "
              f"{args.rounds} rounds in {time.monotonic() - started:.1f} s")
        print("| round | last upload → first notification of the next round (s) | → last notification (s) |")
        print("|---:|---:|---:|")
        for round_, first, last in results:
            print(f"| {round_} | {first:.2f} | {last:.2f} |")
        median_last = statistics.median(r[2] for r in results)
        print(f"| median | {statistics.median(r[1] for r in results):.2f} | {median_last:.2f} |")
        if (target := TARGETS_SECONDS.get(params)) is not None and args.clients == 10:
            status = "met" if median_last < target else "NOT met"
            verdicts.append(f"- 10 × {params:,}: median {median_last:.2f} s < {target} s: {status}")
        sys.stdout.flush()
    if verdicts:
        print("\nTargets (median over the measured rounds, last upload → last client notified):")
        print("\n".join(verdicts))


if __name__ == "__main__":
    main()
