"""Request ids, one JSON log line per request without secrets, and Prometheus metrics."""

import base64
import json
import logging
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fltraining.logs import JsonFormatter
from fltraining.settings import Settings
from routes.app import create_app
from routes.keys import metrics_key
from tests.helpers import PASSWORD, create_training, register, upload_model


async def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    echoed = await client.get("/health", headers={"X-Request-ID": "trace-42.a:b"})
    assert echoed.headers["X-Request-ID"] == "trace-42.a:b"
    generated = await client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    # An id that could break log lines or headers is replaced, not echoed.
    replaced = await client.get("/health", headers={"X-Request-ID": "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"])
    for response in (await client.get("/api/nowhere"), await client.get("/api/users/")):
        assert response.status in {401, 404}
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


async def test_streamed_download_carries_the_request_id(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    response = await client.get(f"/api/models/{model_id}/", headers={**owner.headers, "X-Request-ID": "dl-1"})
    assert response.status == 200 and response.headers["X-Request-ID"] == "dl-1"


async def test_one_json_log_line_per_request_without_secrets(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    user = await register(client)
    caplog.set_level(logging.INFO, logger="fltraining.access")
    basic = base64.b64encode(f"{user.username}:{PASSWORD}".encode()).decode()
    training_id = await create_training(client, user)
    await client.get(f"/api/trainings/{training_id}/?x=1", headers={"Authorization": f"Basic {basic}", "X-Request-ID": "r-1"})
    await client.get("/api/users/myself/", headers={"Authorization": "Token wrong-token-value"})
    lines = [JsonFormatter().format(record) for record in caplog.records if record.name == "fltraining.access"]
    entries = [json.loads(line) for line in lines]
    get = next(entry for entry in entries if entry["request_id"] == "r-1")
    assert get["method"] == "GET" and get["status"] == 200
    assert get["route"] == "/api/trainings/{training_id}/"
    assert isinstance(get["duration_ms"], float)
    assert any(entry["status"] == 401 and entry["route"] == "/api/users/myself/" for entry in entries)
    text = "\n".join(lines)
    for secret in (PASSWORD, user.token, basic, "wrong-token-value", training_id):
        assert secret not in text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics_count_requests_by_route_and_status_and_trainings_by_state(client: TestClient) -> None:
    actor, participant = await register(client), await register(client)
    started = await create_training(client, actor, clients=[participant.id])
    await create_training(client, actor)
    assert (await client.post(f"/api/trainings/{started}/start/", headers=actor.headers)).status == 202
    for _ in range(3):
        await client.get(f"/api/trainings/{started}/", headers=actor.headers)
    await client.get("/api/users/")
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    route = "/api/trainings/{training_id}/"
    assert sample(text, "fltraining_http_requests_total", method="GET", route=route, status="200") == 3
    assert sample(text, "fltraining_http_requests_total", method="GET", route="/api/users/", status="401") == 1
    assert sample(text, "fltraining_http_request_duration_seconds_count", route=route, status="200") == 3
    assert sample(text, "fltraining_http_request_duration_seconds_bucket", route=route, status="200", le="+Inf") == 3
    assert sample(text, "fltraining_trainings", state="I") == 1
    assert sample(text, "fltraining_trainings", state="O") == 1
    assert sample(text, "fltraining_trainings", state="C") == 0


async def test_metrics_sum_every_process_on_the_database(aiohttp_client: Any, settings: Settings) -> None:
    first, second = await aiohttp_client(create_app(settings)), await aiohttp_client(create_app(settings))
    for _ in range(4):
        await first.get("/health")
    await second.get("/health")
    await first.server.app[metrics_key].flush()
    text = await (await second.get("/metrics")).text()
    assert sample(text, "fltraining_http_requests_total", method="GET", route="/health", status="200") == 5
