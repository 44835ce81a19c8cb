"""Service endpoints and the general HTTP rules: health, OpenAPI, docs, and JSON errors everywhere."""

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request

from fltraining.settings import Settings
from fltraining.storage.embedded import EmbeddedStore
from routes.app import create_app
from routes.parsing import media_type
from tests.conftest import with_database
from tests.helpers import PASSWORD, register

# Every operation api.md lists, in the spec's canonical form.
CONTRACT_OPERATIONS = {
    ("/health", "get"),
    ("/api/openapi.json", "get"),
    ("/api/docs/", "get"),
    ("/api/users/", "post"),
    ("/api/users/", "get"),
    ("/api/users/myself/", "get"),
    ("/api/users/{user_id}/", "get"),
    ("/api/users/trainings/", "get"),
    ("/api/models/", "post"),
    ("/api/models/", "get"),
    ("/api/models/{model_id}/metadata/", "get"),
    ("/api/models/{model_id}/", "get"),
    ("/api/models/{model_id}/", "delete"),
    ("/api/trainings/", "post"),
    ("/api/trainings/", "get"),
    ("/api/trainings/{training_id}/", "get"),
    ("/api/trainings/{training_id}/", "patch"),
    ("/api/trainings/{training_id}/", "delete"),
    ("/api/trainings/{training_id}/clients/", "put"),
    ("/api/trainings/{training_id}/clients/", "delete"),
    ("/api/trainings/{training_id}/start/", "post"),
    ("/api/trainings/{training_id}/cancel/", "post"),
}
OPEN_OPERATIONS = {
    ("/health", "get"),
    ("/api/openapi.json", "get"),
    ("/api/docs/", "get"),
    ("/api/users/", "post"),
}


async def assert_json_error(response: Any, status: int) -> dict[str, Any]:
    """The response has this status and the contract's JSON error body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body, dict)
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]
    return dict(body)


# --- health ---------------------------------------------------------------------------------


async def test_health(client: TestClient) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "database": "ok"}


async def test_health_is_503_when_the_database_goes_away(aiohttp_client: Any, settings: Settings) -> None:
    # The service cannot start without its database (start-up installs validators and indexes),
    # so it starts against a store of its own, which is then stopped under the running service.
    store = EmbeddedStore(None)
    url = await asyncio.to_thread(store.start)
    try:
        database_url = with_database(url, "health") + "&serverSelectionTimeoutMS=300&connectTimeoutMS=300"
        client = await aiohttp_client(create_app(settings.model_copy(update={"mongodb_url": database_url})))
        assert (await client.get("/health")).status == 200
    finally:
        await asyncio.to_thread(store.stop)
    response = await client.get("/health")
    assert response.status == 503
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["status"] != "ok"
    assert body["database"] != "ok"


# --- OpenAPI --------------------------------------------------------------------------------


async def openapi_document(client: TestClient) -> dict[str, Any]:
    """GET /api/openapi.json."""
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    return dict(await response.json())


async def test_openapi_lists_every_contract_operation(client: TestClient) -> None:
    document = await openapi_document(client)
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"]
    listed = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert CONTRACT_OPERATIONS <= listed, CONTRACT_OPERATIONS - listed
    # Generated clients name a method after its operationId: two operations of one id would collide.
    ids = Counter(operation["operationId"] for operations in document["paths"].values()
                  for operation in operations.values())
    assert [name for name, count in ids.items() if count > 1] == []


async def test_openapi_security_and_error_responses(client: TestClient) -> None:
    document = await openapi_document(client)
    schemes = document["components"]["securitySchemes"]
    assert {scheme.get("scheme") for scheme in schemes.values()} >= {"bearer", "basic"}
    for path, method in CONTRACT_OPERATIONS:
        operation = document["paths"][path][method]
        if (path, method) in OPEN_OPERATIONS:
            assert "security" not in operation, path
        else:
            assert operation["security"], (path, method)
            assert "401" in operation["responses"], (path, method)
        assert any(status.startswith("2") for status in operation["responses"]), (path, method)


async def test_openapi_references_resolve(client: TestClient) -> None:
    document = await openapi_document(client)
    schemas = document["components"]["schemas"]
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[-1] in schemas, ref


async def test_every_documented_path_is_served_with_and_without_trailing_slash(client: TestClient) -> None:
    document = await openapi_document(client)
    for path, operations in document["paths"].items():
        concrete = re.sub(r"{\w+}", str(uuid.uuid4()), path)
        forms = {concrete, concrete.rstrip("/") or "/", concrete.rstrip("/") + "/"}
        for form in forms:
            for method in operations:
                match = await client.app.router.resolve(make_mocked_request(method.upper(), form))
                assert match.http_exception is None, (method, form, match.http_exception)


# --- docs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/docs", "/api/docs/"])
async def test_docs_page_works_offline(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert not re.search(r"https?://", page)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(asset.endswith(".js") for asset in assets)
    assert any(asset.endswith(".css") for asset in assets)
    scripts = []
    for asset in assets:
        assert asset.startswith("/"), asset  # served by this server, not a CDN
        fetched = await client.get(asset)
        assert fetched.status == 200, asset
        assert len(await fetched.read()) > 0, asset
        if asset.endswith(".js"):
            scripts.append(await fetched.text())
    # The page's own start-up script loads this server's spec.
    assert any("/api/openapi.json" in script for script in scripts)
    # The served Swagger UI knows OpenAPI 3.1 (4.x shows "Unable to render this definition").
    assert any("isOAS31" in script for script in scripts)


# --- general HTTP rules ---------------------------------------------------------------------


# Outside /api/ an unknown path is the dashboard's HTML "not found" page (tests/test_pages.py).
@pytest.mark.parametrize(
    "path", ["/api/nothing-here/", "/api", "/api/users/x/y/z/", "/api/models/x/metadata/extra"]
)
@pytest.mark.parametrize("authenticated", [False, True], ids=["anonymous", "authenticated"])
async def test_unknown_route_is_404_json(client: TestClient, path: str, authenticated: bool) -> None:
    headers = (await register(client)).headers if authenticated else {}
    await assert_json_error(await client.get(path, headers=headers), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/users/"),
        ("DELETE", "/health"),
        ("POST", "/api/users/myself/"),
        ("PATCH", "/api/models/"),
        ("POST", "/api/openapi.json"),
    ],
)
async def test_wrong_method_is_405_json(client: TestClient, method: str, path: str) -> None:
    me = await register(client)
    response = await client.request(method, path, headers=me.headers)
    await assert_json_error(response, 405)
    assert response.headers.get("Allow")


@pytest.fixture(params=["registration", "training creation"])
async def json_endpoint(request: pytest.FixtureRequest, client: TestClient) -> tuple[str, dict[str, str]]:
    """A JSON-body endpoint: the open registration, or training creation (authenticated)."""
    if request.param == "registration":
        return "/api/users/", {}
    me = await register(client)
    return "/api/trainings/", me.headers


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"{'username': 'a'}",
        b"",
        b"\xff\xfe",
        b'{"username": "a"} trailing',
        b'{"a": 1,}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "unclosed",
        "single quotes",
        "empty",
        "not utf-8",
        "trailing garbage",
        "trailing comma",
        "deep nesting",
    ],
)
async def test_malformed_json_is_400(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]], body: bytes
) -> None:
    path, headers = json_endpoint
    response = await client.post(path, data=body, headers={**headers, "Content-Type": "application/json"})
    await assert_json_error(response, 400)


@pytest.mark.parametrize("body", [b"[]", b'[{"username": "a"}]', b'"text"', b"42", b"null", b"true"])
async def test_json_that_is_not_an_object_is_400(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]], body: bytes
) -> None:
    path, headers = json_endpoint
    response = await client.post(path, data=body, headers={**headers, "Content-Type": "application/json"})
    await assert_json_error(response, 400)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_json_with_non_finite_numbers_is_400(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]], constant: str
) -> None:
    path, headers = json_endpoint
    body = (
        f'{{"username": "nan{uuid.uuid4().hex[:6]}", "password": "{PASSWORD}", '
        f'"target_num_updates": {constant}, "options": {{"x": {constant}}}}}'
    )
    response = await client.post(
        path, data=body.encode(), headers={**headers, "Content-Type": "application/json"}
    )
    await assert_json_error(response, 400)


async def test_body_over_one_mib_is_413(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]]
) -> None:
    path, headers = json_endpoint
    body = b'{"username": "big", "password": "' + b"p" * (1024 * 1024) + b'"}'
    response = await client.post(path, data=body, headers={**headers, "Content-Type": "application/json"})
    await assert_json_error(response, 413)


async def test_chunked_body_over_one_mib_is_413(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]]
) -> None:
    path, headers = json_endpoint

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"username": "big", "password": "'
        for _ in range(20):
            yield b"p" * 65536
        yield b'"}'

    response = await client.post(path, data=chunks(), headers={**headers, "Content-Type": "application/json"})
    assert "Content-Length" not in response.request_info.headers
    await assert_json_error(response, 413)


async def test_chunked_body_is_read_whole(client: TestClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"username": "chunked", '
        yield b'"password": "' + PASSWORD.encode() + b'", '
        yield b'"first_name": "' + b"x" * 100 + b'"}'

    response = await client.post("/api/users/", data=chunks(), headers={"Content-Type": "application/json"})
    assert "Content-Length" not in response.request_info.headers
    assert response.status == 201, await response.text()
    assert (await response.json())["first_name"] == "x" * 100


async def test_body_just_under_the_limit_is_read(client: TestClient) -> None:
    # A valid registration padded with whitespace to just under 1 MiB is accepted.
    payload = f'{{"username": "padded", "password": "{PASSWORD}"}}'.encode()
    body = payload + b" " * (1024 * 1024 - len(payload) - 1)
    response = await client.post("/api/users/", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded"]
)
async def test_wrong_content_type_is_415(
    client: TestClient, json_endpoint: tuple[str, dict[str, str]], content_type: str
) -> None:
    path, headers = json_endpoint
    body = f'{{"username": "plain", "password": "{PASSWORD}"}}'.encode()
    response = await client.post(path, data=body, headers={**headers, "Content-Type": content_type})
    await assert_json_error(response, 415)


async def test_json_content_type_with_charset_is_accepted(client: TestClient) -> None:
    body = f'{{"username": "charset", "password": "{PASSWORD}"}}'.encode()
    response = await client.post(
        "/api/users/", data=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status == 201


async def test_field_errors_carry_loc_msg_type(client: TestClient) -> None:
    response = await client.post("/api/users/", json={"username": "", "password": PASSWORD, "extra": 1})
    body = await assert_json_error(response, 400)
    assert body["errors"]
    for error in body["errors"]:
        assert set(error) == {"loc", "msg", "type"}
        assert isinstance(error["loc"], list)
    assert {tuple(error["loc"]) for error in body["errors"]} >= {("username",), ("extra",)}


@pytest.mark.store_independent
@pytest.mark.parametrize(("header", "expected"), [
    ("multipart/form-data; boundary=abc", "multipart/form-data"),
    ("Multipart/Form-Data ;boundary=\"x;y\"", "multipart/form-data"),
    ("application/json", "application/json"),
    (" text/plain ; charset=utf-8", "text/plain"),
    (None, "application/octet-stream"),
])
def test_media_type_reads_the_header_as_aiohttp_does(header: str | None, expected: str) -> None:
    request = make_mocked_request("POST", "/", headers={} if header is None else {"Content-Type": header})
    assert media_type(request) == expected == request.content_type
