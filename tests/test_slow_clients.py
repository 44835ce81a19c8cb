"""Slow and oversized clients over real sockets: 408 on stalled bodies, closed slow headers, 413 unread."""

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pymongo import AsyncMongoClient

from fltraining.storage.blob_gridfs import BUCKET, CHUNK_BYTES, GridFSBlobStore
from fltraining.storage.blobs import WRITE_BATCH_BYTES, Staging
from fltraining.storage.database import database_name, make_client
from tests.helpers import PASSWORD
from tests.processes import ServiceProcess

BODY_TIMEOUT = 1
UPLOAD_TIMEOUT = 2
KEEPALIVE_TIMEOUT = 2
# Trickling clients send a byte this often: well inside the idle timeout, so only a total cuts them.
DRIP_SECONDS = 0.25
# Generous bounds on waiting for an answer: far above the configured timeouts, only there so a
# broken service fails the test instead of hanging it.
ANSWER_WITHIN = 15.0
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service with a 1 s body timeout, 2 s upload timeout and 2 s keep-alive (header) timeout."""
    env = {
        "FLTRAINING_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "FLTRAINING_UPLOAD_TIMEOUT_SECONDS": str(UPLOAD_TIMEOUT),
        "FLTRAINING_KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE_TIMEOUT),
    }
    with ServiceProcess(tmp_path_factory.mktemp("impatient"), env=env) as service:
        yield service


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service with the default timeouts, so slow clients hold their connections during a test."""
    with ServiceProcess(tmp_path_factory.mktemp("patient")) as service:
        yield service


def register(service: ServiceProcess) -> str:
    """A new user's token."""
    body = json.dumps({"username": f"slow{uuid.uuid4().hex[:12]}", "password": PASSWORD}).encode()
    request = urllib.request.Request(service.base_url + "/api/users/", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["token"])


class Connection:
    """A raw HTTP/1.1 connection that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, service: ServiceProcess) -> "Connection":
        """Connect to the service."""
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        """Send bytes and wait until the kernel took them."""
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """Read one response: status, lower-cased headers, body."""
        async with asyncio.timeout(ANSWER_WITHIN):
            status_line = await self.reader.readline()
            assert status_line, "connection closed without a response"
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def until_closed(self) -> bytes:
        """Everything the service sends until it closes the connection."""
        async with asyncio.timeout(ANSWER_WITHIN):
            return await self.reader.read()

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()

    async def trickle(self, drip: bytes) -> None:
        """Send `drip` every DRIP_SECONDS until cancelled or cut off."""
        for _ in range(int(ANSWER_WITHIN / DRIP_SECONDS)):
            await self.send(drip)
            await asyncio.sleep(DRIP_SECONDS)

    async def response_while_trickling(self, drip: bytes) -> tuple[int, dict[str, str], bytes]:
        """The response the service sends while this client keeps trickling bytes."""
        trickling = asyncio.create_task(self.trickle(drip))
        try:
            return await self.response()
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """A request line and header block."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    """The answer is the contract's JSON error with this status."""
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    assert isinstance(json.loads(body)["detail"], str)


@pytest.fixture
async def connections() -> AsyncIterator[list[Connection]]:
    """Connections a test opens; all closed afterwards."""
    opened: list[Connection] = []
    yield opened
    for connection in opened:
        connection.close()


async def test_json_body_that_stops_mid_way_gets_408(impatient: ServiceProcess,
                                                     connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    head = request_head("POST", "/api/users/", {"Content-Type": "application/json", "Content-Length": "100"})
    await connection.send(head + b'{"username": "stal')
    assert_json_error(*await connection.response(), expected=408)


async def test_model_upload_that_stops_mid_file_gets_408_and_keeps_nothing(
        impatient: ServiceProcess, connections: list[Connection]) -> None:
    token = register(impatient)
    store: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{impatient.embedded_port}/?directConnection=true",
        uuidRepresentation="standard")
    chunks = store["fltraining"][f"{BUCKET}.chunks"]
    try:
        before = (await chunks.count_documents({}), blob_files(impatient))
        await stall_an_upload(impatient, connections, token)
        assert (await chunks.count_documents({}), blob_files(impatient)) == before
    finally:
        await store.close()
    async with (aiohttp.ClientSession() as session,
                session.get(impatient.base_url + "/api/models/",
                            headers={"Authorization": f"Token {token}"}) as response):
        assert response.status == 200
        assert await response.json() == []


def blob_files(service: ServiceProcess) -> list[str]:
    """Every file under the service's blob and staging folders (whichever blob store it runs)."""
    return sorted(str(path) for folder in ("blobs", "staging") for path in (service.data_dir / folder).rglob("*")
                  if path.is_file())


async def stall_an_upload(service: ServiceProcess, connections: list[Connection], token: str) -> None:
    """Send part of a model upload, stop, and expect 408."""
    boundary = "slowboundary"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nslow\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
    head = request_head("POST", "/api/models/", {
        "Authorization": f"Token {token}", "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(preamble) + 4 * MIB),
    })
    connection = await Connection.open(service)
    connections.append(connection)
    # Past two insert batches: the service stores what arrived before its idle timer starts, so
    # part of the file is in the store when the 408 is decided and has to be removed.
    await connection.send(head + preamble + b"\1" * (5 * MIB // 2))
    assert_json_error(*await connection.response(), expected=408)


async def test_headers_sent_slowly_get_the_connection_closed(impatient: ServiceProcess,
                                                             connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    await connection.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # One header byte at a time: activity must not extend the header deadline.
    trickling = asyncio.create_task(connection.trickle(b"X"))
    try:
        assert await connection.until_closed() == b""
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)


async def test_json_body_trickled_byte_by_byte_gets_408(impatient: ServiceProcess,
                                                       connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    head = request_head("POST", "/api/users/", {"Content-Type": "application/json", "Content-Length": "1000"})
    await connection.send(head + b"{")
    assert_json_error(*await connection.response_while_trickling(b" "), expected=408)


async def test_model_upload_trickled_in_small_pieces_gets_408(impatient: ServiceProcess,
                                                          connections: list[Connection]) -> None:
    token = register(impatient)
    boundary = "dripboundary"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
    head = request_head("POST", "/api/models/", {
        "Authorization": f"Token {token}", "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(preamble) + MIB),
    })
    connection = await Connection.open(impatient)
    connections.append(connection)
    await connection.send(head + preamble)
    # Enough per drip for aiohttp to look past the boundary, so each read returns within the idle
    # timeout and only the upload's total waiting time cuts it off.
    assert_json_error(*await connection.response_while_trickling(b"\1" * 64), expected=408)


async def test_health_answers_while_50_slow_clients_hold_connections(patient: ServiceProcess,
                                                                     connections: list[Connection]) -> None:
    body = b'{"username": "slow"}'.ljust(1000)
    slow_body = request_head("POST", "/api/users/", {"Content-Type": "application/json",
                                                     "Content-Length": str(len(body))})
    slow_head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    for index in range(50):
        connection = await Connection.open(patient)
        connections.append(connection)
        await connection.send(slow_head if index % 2 else slow_body + body[:6])
    timeout = aiohttp.ClientTimeout(total=ANSWER_WITHIN)
    async with (aiohttp.ClientSession(timeout=timeout) as session,
                session.get(patient.base_url + "/health") as response):
        assert response.status == 200
        assert (await response.json())["status"] == "ok"
    # The slow clients were still being waited for: finishing their requests now gets answers.
    for index, connection in enumerate(connections):
        await connection.send(b"1\r\n\r\n" if index % 2 else body[6:])
    for index, connection in enumerate(connections):
        status, _, answer = await connection.response()
        assert status == (200 if index % 2 else 400), answer


async def test_json_body_over_the_limit_with_content_length_is_refused_unread(
        impatient: ServiceProcess, connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    head = request_head("POST", "/api/users/", {"Content-Type": "application/json",
                                                "Content-Length": str(2 * MIB)})
    # Only 1 KiB of the announced 2 MiB is ever sent: the answer cannot depend on the rest.
    await connection.send(head + b'{"username": "' + b"x" * 1024)
    assert_json_error(*await connection.response(), expected=413)


async def test_chunked_json_body_over_the_limit_is_refused_once_past_it(
        impatient: ServiceProcess, connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    await connection.send(request_head("POST", "/api/users/", {"Content-Type": "application/json",
                                                               "Transfer-Encoding": "chunked"}))
    piece = b"x" * (64 * 1024)
    # 1 MiB + 128 KiB of a 2 MiB body, never the terminating chunk: the service stops at its limit.
    for _ in range(18):
        await connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    assert_json_error(*await connection.response(), expected=413)


async def test_json_body_within_the_timeout_is_read(impatient: ServiceProcess,
                                                    connections: list[Connection]) -> None:
    connection = await Connection.open(impatient)
    connections.append(connection)
    body = json.dumps({"username": f"ok{uuid.uuid4().hex[:12]}", "password": PASSWORD}).encode()
    head = request_head("POST", "/api/users/", {"Content-Type": "application/json",
                                                "Content-Length": str(len(body))})
    await connection.send(head + body[:10])
    await connection.send(body[10:])
    status, _, answer = await connection.response()
    assert status == 201, answer


async def logged_status(service: ServiceProcess, marker: str) -> int:
    """The status the service logged for the request with this X-Request-ID (waits for its log line)."""
    async with asyncio.timeout(ANSWER_WITHIN):
        while marker not in service.log():
            await asyncio.sleep(0.05)  # polling the log for the request's line, not waiting out a race
    line = next(line for line in service.log().splitlines() if marker in line)
    return int(json.loads(line)["status"])


async def test_client_that_disconnects_mid_body_is_no_server_error(impatient: ServiceProcess) -> None:
    connection = await Connection.open(impatient)
    marker = f"gone{uuid.uuid4().hex}"
    head = request_head("POST", "/api/users/", {"Content-Type": "application/json", "Content-Length": "100",
                                                "X-Request-ID": marker})
    await connection.send(head + b'{"username": "gone')
    connection.close()
    assert await logged_status(impatient, marker) == 499
    assert "Connection lost" not in impatient.log()


async def test_model_upload_cut_off_mid_file_leaves_no_blob_and_no_model(impatient: ServiceProcess) -> None:
    token = register(impatient)
    before = blob_files(impatient)
    boundary = "cutboundary"
    marker = f"cut{uuid.uuid4().hex}"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\ncut\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
    head = request_head("POST", "/api/models/", {
        "Authorization": f"Token {token}", "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(preamble) + 8 * MIB), "X-Request-ID": marker,
    })
    connection = await Connection.open(impatient)
    await connection.send(head + preamble + b"\0" * (3 * MIB))  # more than a write batch reaches the disk
    connection.close()
    assert await logged_status(impatient, marker) == 499
    assert blob_files(impatient) == before
    async with (aiohttp.ClientSession() as session,
                session.get(impatient.base_url + "/api/models/",
                            headers={"Authorization": f"Token {token}"}) as response):
        assert all(model["name"] != "cut" for model in await response.json())


async def test_upload_holds_at_most_one_batch_before_it_reaches_the_disk(tmp_path: Path) -> None:
    staging = Staging(tmp_path)
    unwritten: list[int] = []
    piece = b"\1" * (64 * 1024)

    async def pieces() -> AsyncIterator[bytes]:
        for index in range(1, 4 * 16 + 1):  # 4 MiB
            yield piece
            on_disk = sum(path.stat().st_size for path in tmp_path.glob("*"))
            unwritten.append(index * len(piece) - on_disk)

    staged = await staging.write(pieces(), 16 * MIB)
    assert staged.size == 4 * MIB and staged.path.stat().st_size == 4 * MIB
    assert max(unwritten) <= WRITE_BATCH_BYTES


async def test_gridfs_commit_moves_the_staged_file_into_the_bucket(database_url: str, tmp_path: Path) -> None:
    client = make_client(database_url)
    database = client[database_name(database_url, "fltraining")]
    store = GridFSBlobStore(database, Staging(tmp_path))

    async def content() -> AsyncIterator[bytes]:
        yield b"\2" * (4 * MIB)

    try:
        staged = await store.stage(content(), 16 * MIB)
        stored = await store.commit(staged)
        chunks = await database[f"{BUCKET}.chunks"].count_documents({"files_id": stored.file_id})
        read_back = b"".join([chunk async for chunk in await store.open_chunks(stored.file_id)])
    finally:
        await client.close()
    assert chunks == -(-4 * MIB // CHUNK_BYTES)
    assert read_back == b"\2" * (4 * MIB)
    assert not staged.path.exists()
