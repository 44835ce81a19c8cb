"""Models: multipart upload into the blob store, metadata, download, access rules and deletion."""

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from fltraining.settings import Settings
from routes.app import create_app
from tests.helpers import (
    PASSWORD,
    Account,
    blob_bytes,
    create_training,
    nothing_stored,
    register,
    sized_model,
    small_model,
    stored_blobs,
    upload_model,
)

METADATA_KEYS = {"id", "name", "description", "owner", "round", "input_shape", "size", "sha256", "format",
                 "graph_digest", "ensemble_members", "created_at"}


WEIGHTS = small_model()
SECRET = sized_model(400, seed=7)


def model_form(content: bytes | None = WEIGHTS, **fields: str) -> FormData:
    """A multipart body; `content=None` leaves out the file."""
    form = FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    if content is not None:
        form.add_field("model_file", content, filename="model.pt", content_type="application/octet-stream")
    return form


async def metadata(client: TestClient, account: Account, model_id: str) -> dict[str, Any]:
    """GET a model's metadata, asserting 200."""
    response = await client.get(f"/api/models/{model_id}/metadata/", headers=account.headers)
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def test_upload_is_accepted(client: TestClient) -> None:
    owner = await register(client)
    form = model_form(
        small_model(), name="mnist", description="a small CNN", input_shape="[null, 1, 28, 28]"
    )
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 201, await response.text()
    body = await response.json()
    assert set(body) == {"detail", "model_id"}
    assert body["detail"] == "Model Upload Accepted"
    assert str(uuid.UUID(body["model_id"])) == body["model_id"]
    assert response.headers["Location"] == f"/api/models/{body['model_id']}/metadata/"


async def test_metadata(client: TestClient) -> None:
    owner = await register(client)
    content = sized_model(5000)
    model_id = await upload_model(
        client, owner, content, name="mnist", description="CNN", input_shape="[null, 1, 28, 28]"
    )
    body = await metadata(client, owner, model_id)
    assert set(body) == METADATA_KEYS
    assert body["id"] == model_id
    assert (body["name"], body["description"], body["owner"]) == ("mnist", "CNN", owner.id)
    assert body["round"] == 0
    assert body["input_shape"] == [None, 1, 28, 28]
    assert body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["created_at"].endswith("Z")
    assert (body["format"], body["graph_digest"], body["ensemble_members"]) == ("safetensors", None, None)


async def test_download_returns_the_exact_bytes(client: TestClient) -> None:
    owner = await register(client)
    content = sized_model(768)
    model_id = await upload_model(client, owner, content)
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"] == f'attachment; filename="model-{model_id}.pt"'
    assert await response.read() == content


async def test_download_without_trailing_slash(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    response = await client.get(f"/api/models/{model_id}", headers=owner.headers)
    assert response.status == 200
    assert await response.read() == small_model()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "the file is empty"),
        (b"just some text a user picked in the frontend's Create Model dialog\n", "not a recognised model format"),
        (b"\x80\x04K\x01.", "pickle"),
    ],
    ids=["empty", "text", "pickle"],
)
async def test_a_file_in_no_accepted_format_is_refused_at_upload(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], content: bytes, why: str
) -> None:
    """DLR refuses invalid model files at upload; before, fltraining answered 201 and only start failed."""
    owner = await register(client)
    response = await client.post("/api/models/", data=model_form(content, name="m"), headers=owner.headers)
    assert response.status == 400
    detail = (await response.json())["detail"]
    assert why in detail and "Accepted formats: safetensors" in detail
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


async def test_multi_mib_file_round_trips_through_the_blob_store(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    owner = await register(client)
    content = sized_model(3 * 1024 * 1024 + 12345)
    model_id = await upload_model(client, owner, content)
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 200
    downloaded = await response.read()
    assert len(downloaded) == len(content)
    assert downloaded == content
    body = await metadata(client, owner, model_id)
    assert body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()

    # The bytes live in the blob store; the model document only points at them.
    document = await raw_db["models"].find_one({"_id": uuid.UUID(model_id)})
    assert document is not None
    assert len(repr(document)) < 2000
    assert await stored_blobs(client) == {document["file_id"]}
    assert await blob_bytes(client, document["file_id"]) == content


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("[1, 28, 28]", [1, 28, 28]),
        ("[None, 3]", [None, 3]),
        ("null", None),
        ("None", None),
        ("", None),
        ("[]", []),
        ("7", [7]),  # one dimension: DLR reads the field as a list
    ],
)
async def test_input_shape_forms(client: TestClient, sent: str, stored: Any) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner, input_shape=sent)
    assert (await metadata(client, owner, model_id))["input_shape"] == stored


async def test_input_shape_is_optional(client: TestClient) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    assert (await metadata(client, owner, model_id))["input_shape"] is None


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "m", "input_shape": "[1, 2"},
        {"name": "m", "input_shape": "abc"},
        {"name": "m", "input_shape": "[1.5, 2]"},
        {"name": "m", "input_shape": '["a"]'},
        {"name": "m", "input_shape": "[true]"},
        {"name": "m", "input_shape": '{"a": 1}'},
        {"name": "m", "input_shape": "[" + ", ".join(["1"] * 33) + "]"},
        {"name": "m", "input_shape": "[1, 99999999999999999999999999]"},
        {"name": ""},
        {"name": "x" * 257},
        {"description": "no name"},
    ],
    ids=[
        "unclosed list",
        "not json",
        "float",
        "string item",
        "bool item",
        "object",
        "too many dims",
        "dim past 64 bits",
        "empty name",
        "long name",
        "missing name",
    ],
)
async def test_invalid_upload_fields_are_400(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], fields: dict[str, str]
) -> None:
    owner = await register(client)
    response = await client.post("/api/models/", data=model_form(**fields), headers=owner.headers)
    assert response.status == 400, await response.text()
    assert "detail" in await response.json()
    # A rejected upload leaves neither a model nor its bytes behind.
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


async def test_missing_model_file_is_400(client: TestClient) -> None:
    owner = await register(client)
    response = await client.post(
        "/api/models/", data=model_form(None, name="m", description="d"), headers=owner.headers
    )
    assert response.status == 400
    assert "model_file" in (await response.json())["detail"]


async def test_two_model_files_are_400(client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]) -> None:
    owner = await register(client)
    form = model_form(small_model(), name="m")
    form.add_field("model_file", sized_model(200), filename="second.pt", content_type="application/octet-stream")
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 400
    assert await nothing_stored(client)


async def test_unknown_multipart_field_is_400(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    owner = await register(client)
    response = await client.post(
        "/api/models/", data=model_form(name="m", surprise="x"), headers=owner.headers
    )
    assert response.status == 400
    assert "surprise" in (await response.json())["detail"]
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


@pytest.mark.parametrize(
    "body",
    [
        b"--B\r\nNone--B--\r\n",
        b"no boundary here",
        b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nm\r\n--X\r\n',
        b'--B\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n\r\n' + WEIGHTS,
        b'--B\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n' + b"x" * 40 + b"\r\n--B--\r\n",
    ],
    ids=["bad part header", "no boundary", "wrong boundary", "truncated file", "long charset"],
)
async def test_malformed_multipart_is_400_and_leaves_nothing(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], body: bytes
) -> None:
    owner = await register(client)
    headers = {**owner.headers, "Content-Type": "multipart/form-data; boundary=B"}
    response = await client.post("/api/models/", data=body, headers=headers)
    assert response.status == 400, await response.text()
    assert (await response.json())["detail"].startswith("Malformed multipart body")
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"json": {"name": "m", "model_file": "AAAA"}},
        {"data": b"raw bytes", "headers": {"Content-Type": "application/octet-stream"}},
        {"data": {"name": "m"}},  # application/x-www-form-urlencoded
    ],
    ids=["json", "octet-stream", "urlencoded"],
)
async def test_non_multipart_upload_is_415(client: TestClient, kwargs: dict[str, Any]) -> None:
    owner = await register(client)
    headers = {**owner.headers, **kwargs.pop("headers", {})}
    response = await client.post("/api/models/", headers=headers, **kwargs)
    assert response.status == 415
    assert "detail" in await response.json()


@pytest.mark.parametrize("size", [1001, 600_000], ids=["just over", "many chunks over"])
async def test_file_over_the_limit_is_413_and_leaves_nothing(
    aiohttp_client: Any, settings: Settings, raw_db: AsyncDatabase[dict[str, Any]], size: int
) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"max_model_bytes": 1000})))
    owner = await register(client)
    response = await client.post(
        "/api/models/", data=model_form(sized_model(size), name="big"), headers=owner.headers
    )
    assert response.status == 413
    assert "detail" in await response.json()
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)
    # A file at the limit is still accepted.
    await upload_model(client, owner, sized_model(1000))


async def test_declared_body_far_over_the_limit_is_413(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"max_model_bytes": 1000})))
    owner = await register(client)
    response = await client.post(
        "/api/models/", data=model_form(b"\x00" * (3 * 1024 * 1024), name="huge"), headers=owner.headers
    )
    assert response.status == 413


async def test_access_rules(client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]) -> None:
    owner = await register(client)
    participant = await register(client)
    stranger = await register(client)
    model_id = await upload_model(client, owner, SECRET)
    await create_training(client, owner, model_id, clients=[participant.id])

    for account in (owner, participant):
        assert (await metadata(client, account, model_id))["id"] == model_id
        response = await client.get(f"/api/models/{model_id}/", headers=account.headers)
        assert response.status == 200
        assert await response.read() == SECRET

    for path in (f"/api/models/{model_id}/metadata/", f"/api/models/{model_id}/"):
        response = await client.get(path, headers=stranger.headers)
        assert response.status == 403
        assert response.content_type == "application/json"
        assert "detail" in await response.json()

    # An actor who does not own the model (written directly, as a MongoDB-native tool could) reaches it too.
    await raw_db["trainings"].update_one(
        {"model": uuid.UUID(model_id)}, {"$set": {"actor": uuid.UUID(stranger.id)}}
    )
    assert (await metadata(client, stranger, model_id))["id"] == model_id


@pytest.mark.parametrize("path", ["/api/models/{id}/metadata/", "/api/models/{id}/"])
@pytest.mark.parametrize("model_id", [str(uuid.uuid4()), "not-a-uuid"], ids=["unknown", "malformed"])
async def test_unknown_model_is_404(client: TestClient, path: str, model_id: str) -> None:
    me = await register(client)
    response = await client.get(path.format(id=model_id), headers=me.headers)
    assert response.status == 404
    assert "detail" in await response.json()


async def test_list_shows_owned_and_reachable_models_only(client: TestClient) -> None:
    alice = await register(client)
    bob = await register(client)
    carol = await register(client)
    shared = await upload_model(client, alice, name="shared")
    private = await upload_model(client, alice, name="private")
    await create_training(client, alice, shared, clients=[bob.id])
    bobs = await upload_model(client, bob, name="bobs")
    carols = await upload_model(client, carol, name="carols")

    async def listed(account: Account) -> set[str]:
        response = await client.get("/api/models/", headers=account.headers)
        assert response.status == 200
        items = await response.json()
        assert all(set(item) == METADATA_KEYS for item in items)
        return {item["id"] for item in items}

    assert await listed(alice) == {shared, private}
    assert await listed(bob) == {shared, bobs}
    assert await listed(carol) == {carols}


async def test_a_participant_of_500_trainings_lists_their_models(
        client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]) -> None:
    alice, bob = await register(client), await register(client)
    shared = await upload_model(client, alice, name="shared")
    first = await create_training(client, alice, shared, clients=[bob.id])
    stored = await raw_db.trainings.find_one({"_id": uuid.UUID(first)})
    assert stored is not None
    # 499 more trainings of models that no longer exist (what deleted models leave is not listed).
    await raw_db.trainings.insert_many([{**stored, "_id": uuid.uuid4(), "model": uuid.uuid4()} for _ in range(499)])
    response = await client.get("/api/models/", headers=bob.headers)
    assert response.status == 200, await response.text()
    assert [item["id"] for item in await response.json()] == [shared]


async def test_models_reached_through_many_trainings_are_listed_newest_first(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's training models are asked for in pieces (the embedded store cannot compile a `$in` of more
    # than ~450 values); a piece of one model each makes every model its own query.
    monkeypatch.setattr("fltraining.storage.queries.IN_CHUNK", 1)
    alice, bob = await register(client), await register(client)
    reached = []
    for index in range(3):
        model_id = await upload_model(client, alice, name=f"shared {index}")
        await create_training(client, alice, model_id, clients=[bob.id])
        reached.append(model_id)
    own = await upload_model(client, bob, name="own")
    await create_training(client, bob, own)  # owned and reached through its training: listed once
    response = await client.get("/api/models/", headers=bob.headers)
    assert response.status == 200
    assert [item["id"] for item in await response.json()] == [own, *reversed(reached)]


async def test_owner_deletes_a_model_and_its_training(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    owner = await register(client)
    model_id = await upload_model(client, owner)
    training_id = await create_training(client, owner, model_id)
    stored = await raw_db["models"].find_one({"_id": uuid.UUID(model_id)})
    assert stored is not None
    file_id = stored["file_id"]

    response = await client.delete(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 200
    assert await response.json() == {"detail": "Model removed!"}
    assert (await client.get(f"/api/models/{model_id}/metadata/", headers=owner.headers)).status == 404
    assert (await client.get(f"/api/trainings/{training_id}/", headers=owner.headers)).status == 404
    assert file_id not in await stored_blobs(client)
    response = await client.delete(f"/api/models/{model_id}/", headers=owner.headers)
    assert response.status == 404


async def test_stranger_and_participant_cannot_delete(client: TestClient) -> None:
    owner = await register(client)
    participant = await register(client)
    stranger = await register(client)
    model_id = await upload_model(client, owner, SECRET)
    training_id = await create_training(client, owner, model_id, clients=[participant.id])
    for account in (stranger, participant):
        response = await client.delete(f"/api/models/{model_id}/", headers=account.headers)
        assert response.status == 403
        assert "detail" in await response.json()
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert await response.read() == SECRET
    assert (await client.get(f"/api/trainings/{training_id}/", headers=owner.headers)).status == 200


async def test_actor_of_its_training_may_delete(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]]
) -> None:
    owner = await register(client)
    actor = await register(client)
    model_id = await upload_model(client, owner)
    await create_training(client, owner, model_id)
    await raw_db["trainings"].update_one(
        {"model": uuid.UUID(model_id)}, {"$set": {"actor": uuid.UUID(actor.id)}}
    )
    response = await client.delete(f"/api/models/{model_id}/", headers=actor.headers)
    assert response.status == 200
    assert await raw_db["models"].count_documents({"_id": uuid.UUID(model_id)}) == 0
    assert await raw_db["trainings"].count_documents({"model": uuid.UUID(model_id)}) == 0


async def test_dlr_mnist_create_model_request_is_accepted(client: TestClient) -> None:
    """DLR's MNIST create-model.sh: Basic auth, `Accept: application/json`, `input_shape` repeated once
    per dimension with None for the batch (before: 400 "Field 'input_shape' may be sent once.")."""
    owner = await register(client)
    form = FormData()
    form.add_field("name", "MNIST Model")
    form.add_field("description", "A PyTorch model for MNIST classification")
    for dimension in ("None", "1", "28", "28"):
        form.add_field("input_shape", dimension)
    form.add_field("model_file", small_model(), filename="torch-model.pt")
    basic = "Basic " + base64.b64encode(f"{owner.username}:{PASSWORD}".encode()).decode()
    response = await client.post("/api/models/", data=form,
                                 headers={"Authorization": basic, "Accept": "application/json"})
    assert response.status == 201, await response.text()
    model_id = (await response.json())["model_id"]
    assert (await metadata(client, owner, model_id))["input_shape"] == [None, 1, 28, 28]


@pytest.mark.parametrize("dimensions", [("None", "x"), ("1", "2.5"), ("1",) * 33, ("1", "99999999999999999999")])
async def test_bad_repeated_input_shape_is_400_and_stores_nothing(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], dimensions: tuple[str, ...]
) -> None:
    owner = await register(client)
    form = model_form(small_model(), name="m")
    for dimension in dimensions:
        form.add_field("input_shape", dimension)
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 400
    assert "input_shape" in json.dumps(await response.json())
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


TORCH_FIXTURES = Path(__file__).parent / "fixtures" / "torch"


@pytest.mark.parametrize("fixture", ["script.pt", "module.pt"])
async def test_torchscript_and_whole_modules_are_refused_at_upload_saying_what_to_send(
    client: TestClient, raw_db: AsyncDatabase[dict[str, Any]], fixture: str
) -> None:
    """Files written by real torch (tests/fixtures/torch): code is never loaded, nothing is stored."""
    owner = await register(client)
    form = model_form((TORCH_FIXTURES / fixture).read_bytes(), name="m")
    response = await client.post("/api/models/", data=form, headers=owner.headers)
    assert response.status == 400
    detail = (await response.json())["detail"]
    assert "torch.save(model.state_dict(), f)" in detail and "safetensors" in detail
    assert await raw_db["models"].count_documents({}) == 0
    assert await nothing_stored(client)


async def test_a_pytorch_state_dict_is_accepted_and_described(client: TestClient,
                                                             raw_db: AsyncDatabase[dict[str, Any]]) -> None:
    owner = await register(client)
    content = (TORCH_FIXTURES / "state_dict_mixed.pt").read_bytes()
    model_id = await upload_model(client, owner, content)
    stored = await raw_db["models"].find_one({"_id": uuid.UUID(model_id)})
    assert stored is not None and stored["format"] == "torch"
    assert {(t["name"], tuple(t["shape"]), t["dtype"]) for t in stored["tensors"]} == {
        ("fc.weight", (4, 3), "float32"), ("fc.bias", (4,), "float32"), ("out.weight", (2, 4), "float32"),
        ("out.bias", (2,), "float32"), ("bn.num_batches_tracked", (), "int64")}
    response = await client.get(f"/api/models/{model_id}/", headers=owner.headers)
    assert await response.read() == content
