"""How fast the dashboard is usable with 100 trainings, and what its pages weigh (make bench-dashboard).

`fltraining serve` on a fresh embedded store (as `make run` starts it), 100 trainings of one actor with
five participants each, one of them run through three rounds with test metrics. Headless chromium
(Debian's) opens each page with the actor signed in (the token put into sessionStorage first) and the
time from navigation until the page is usable is measured: the trainings table with its first page of rows,
or a training's page with its facts, round progress, chart and events drawn. The baseline, in the same run
and browser, is the dashboard's static "not found" page (HTML and CSS, no script, no API call): what any
page load costs here. Page weight: every byte the browser received outside /api/ (uncompressed).
"""

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from playwright.async_api import Page, async_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fltraining.weights import dump_tensors
from tests.processes import ServiceProcess

TRAININGS = 100
PARTICIPANTS = 5
TARGET_MS = 1000
WEIGHT_LIMIT = 500 * 1024
PASSWORD = "dashboard bench password"


async def register(session: aiohttp.ClientSession, name: str, **extra: Any) -> dict[str, str]:
    """A user; returns its id and token."""
    async with session.post("/api/users/", json={"username": name, "password": PASSWORD, **extra}) as response:
        response.raise_for_status()
        body = await response.json()
    return {"id": body["id"], "token": body["token"]}


def model_file() -> bytes:
    """A small model, as the trainings' clones share."""
    return dump_tensors({"w": np.zeros((16, 16), np.float32), "b": np.zeros(16, np.float32)})


async def populate(base_url: str) -> tuple[str, str]:
    """100 trainings of one actor; the last one run through three rounds. Returns (actor token, its id)."""
    async with aiohttp.ClientSession(base_url=base_url) as session:
        actor = await register(session, "actor", actor=True)
        auth = {"Authorization": f"Token {actor['token']}"}
        people = [await register(session, f"client{i}", first_name=f"Client {i}") for i in range(PARTICIPANTS)]
        form = aiohttp.FormData()
        form.add_field("name", "bench model")
        form.add_field("model_file", model_file(), filename="model.safetensors")
        async with session.post("/api/models/", data=form, headers=auth) as response:
            response.raise_for_status()
            model_id = (await response.json())["model_id"]
        training_id = ""
        for index in range(TRAININGS):
            body = {"model_id": model_id, "target_num_updates": 3, "clients": [p["id"] for p in people]}
            async with session.post("/api/trainings/", json=body, headers=auth) as response:
                response.raise_for_status()
                training_id = (await response.json())["training_id"]
        await run_rounds(session, auth, people, training_id)
        return actor["token"], training_id


async def run_rounds(session: aiohttp.ClientSession, auth: dict[str, str], people: list[dict[str, str]],
                     training_id: str) -> None:
    """Start the training and upload every participant's update (with a metric) for each of its rounds."""
    async with session.post(f"/api/trainings/{training_id}/start/", headers=auth) as response:
        response.raise_for_status()
    async with session.get(f"/api/trainings/{training_id}/", headers=auth) as response:
        global_model = (await response.json())["model"]
    for round_ in range(3):
        await wait_for_phase(session, auth, training_id, round_, "updates")
        for person in people:
            form = aiohttp.FormData()
            form.add_field("round", str(round_))
            form.add_field("sample_size", "10")
            form.add_field("model_file", model_file(), filename="update.safetensors")
            await until_accepted(session, f"/api/models/{global_model}/", person, data=form)
        await wait_for_phase(session, auth, training_id, round_ + 1, "testing")
        for index, person in enumerate(people):
            metrics = {"metric_names": ["accuracy"], "metric_values": [0.5 + round_ / 10 + index / 100]}
            await until_accepted(session, f"/api/models/{global_model}/metrics/", person, json=metrics)


async def wait_for_phase(session: aiohttp.ClientSession, auth: dict[str, str], training_id: str, round_: int,
                         phase: str) -> None:
    """Poll the training until it waits in `phase` of `round_` (metrics count only in the test phase)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with session.get(f"/api/trainings/{training_id}/", headers=auth) as response:
            training = await response.json()
        if (training["round"], training["phase"]) == (round_, phase):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"training never reached round {round_}, phase {phase}: {training}")


async def until_accepted(session: aiohttp.ClientSession, path: str, person: dict[str, str], **body: Any) -> None:
    """POST until 201: 409 while the round's previous phase is still being completed."""
    headers = {"Authorization": f"Token {person['token']}"}
    deadline = time.monotonic() + 60
    while True:
        async with session.post(path, headers=headers, **body) as response:
            if response.status == 201:
                return
            if response.status != 409 or time.monotonic() > deadline:
                raise RuntimeError(f"{path} answered {response.status}: {await response.text()}")
        await asyncio.sleep(0.05)


async def timed(page: Page, url: str, ready: str) -> float:
    """Milliseconds from navigation until `ready` (a selector) is visible."""
    started = time.perf_counter()
    await page.goto(url)
    await page.wait_for_selector(ready, state="visible", timeout=30_000)
    return (time.perf_counter() - started) * 1000


async def measure(base_url: str, token: str, training_id: str, repeats: int, chromium: str) -> list[list[str]]:
    """Each page's time to usable (median, max) and weight."""
    pages = [
        ("baseline: static not-found page", "/no-such-page", "main h1"),
        (f"trainings ({TRAININGS}, first page of 50 rows)", "/", "table.trainings tbody tr:nth-child(50)"),
        # The versions table is drawn once facts, progress, chart and events are all in.
        ("a training (3 rounds, 5 participants, chart, events)", f"/trainings/{training_id}",
         "table.versions tbody tr"),
    ]
    rows = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        baseline_ms = None
        for name, path, ready in pages:
            # A fresh browser context per page: its first load is cold (nothing cached), and weighs the page.
            context = await browser.new_context()
            await context.add_init_script(f"sessionStorage.setItem('fltraining.token', {token!r})")
            page = await context.new_page()
            received: dict[str, int] = {}
            pending: list[asyncio.Future[None]] = []

            async def count(response: Any, received: dict[str, int] = received) -> None:
                path = urlsplit(response.url).path
                if not path.startswith("/api/") and not 300 <= response.status < 400:
                    received[path] = len(await response.body())

            page.on("response", lambda response, pending=pending, count=count: pending.append(
                asyncio.ensure_future(count(response))))
            cold = await timed(page, base_url + path, ready)
            await asyncio.sleep(0.3)  # let the last responses' bodies be read
            await asyncio.gather(*pending)
            weight = sum(received.values())
            times = [await timed(page, base_url + path, ready) for _ in range(repeats)]
            await context.close()
            median = statistics.median(times)
            baseline_ms = baseline_ms or median
            usable = "—" if name.startswith("baseline") else ("met" if max(cold, *times) <= TARGET_MS else "NOT MET")
            rows.append([name, f"{cold:.0f}", f"{median:.0f}", f"{max(times):.0f}", f"{median / baseline_ms:.1f}×",
                         f"{weight / 1024:.1f} KiB", usable])
        await browser.close()
    return rows


def main() -> None:
    """Populate a fresh service, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    chromium = os.environ.get("FLTRAINING_TEST_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="fltraining-dashboard-bench-") as data, ServiceProcess(Path(data)) as service:
        token, training_id = asyncio.run(populate(service.base_url))
        rows = asyncio.run(measure(service.base_url, token, training_id, args.repeats, chromium))
    print(f"\nDashboard on the embedded store, {TRAININGS} trainings, headless chromium, {args.repeats} loads each "
          f"({time.strftime('%Y-%m-%d')})\n")
    print("| page | usable after, first (cold) load, ms | later loads, median ms | max ms | median vs baseline "
          "| page weight (outside /api/, cold) | ≤ 1 s |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    assets = sum(path.stat().st_size for path in (Path(__file__).resolve().parent.parent / "routes" / "static").iterdir())
    print(f"\nall dashboard assets: {assets / 1024:.1f} KiB (limit {WEIGHT_LIMIT // 1024} KiB)")


if __name__ == "__main__":
    main()
