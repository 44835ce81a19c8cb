"""A bare aiohttp + PyMongo server doing the store operations each benchmarked endpoint needs (the baseline).

No pydantic, no Beanie, no authentication: plain dicts and the fewest store calls a correct handler makes.
GET /trainings/{id}?actor=A    find_one by _id (projection-free), visibility check, JSON with an ETag;
                               with a matching If-None-Match only the version is read and 304 answered
GET /trainings?actor=A         find by actor, newest first, 100 documents (projection-free), plus the count
                               when the page is full; a JSON array with an ETag; 304 likewise
POST /trainings                {"actor", "model_id", "target_num_updates"}: what a creation needs at least:
                               find the model, check it is unused, clone it (it is in use, so the clone is
                               marked with the training), insert the training
"""

import argparse
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

client_key = web.AppKey("client", AsyncMongoClient[dict[str, Any]])
db_name_key = web.AppKey("db_name", str)

LIMIT = 100
ORDER = [("last_update", -1), ("_id", -1)]
VERSION_PROJECTION = {"_id": 1, "version": 1}


def training_document(actor: uuid.UUID, model: uuid.UUID, target_num_updates: int,
                      training_id: uuid.UUID | None = None) -> dict[str, Any]:
    """A new training in state I with every field the `trainings` validator requires."""
    now = datetime.now(UTC)
    return {
        "_id": training_id or uuid.uuid4(), "model": model, "actor": actor, "participants": [], "state": "I",
        "base_target_num_updates": target_num_updates, "target_num_updates": target_num_updates,
        "last_update": now, "created_at": now, "uncertainty_method": "NONE", "aggregation_method": "FedAvg",
        "options": {}, "metric_names": [], "locked": False, "state_detail": None, "version": 1,
        "round": 0, "phase": None, "round_participants": [], "round_arrived": [], "round_deadline": None,
        "lease_owner": None, "lease_until": None, "chain": [], "effects": [], "effects_pending": False,
    }


def clone_document(model: dict[str, Any], training_id: uuid.UUID) -> dict[str, Any]:
    """A stored model's clone, waiting for its training (the service's clone rule)."""
    return {**model, "_id": uuid.uuid4(), "cloned_from": model["_id"], "pending_training": training_id,
            "created_at": datetime.now(UTC)}


def list_etag(actor: uuid.UUID, total: int, items: Iterable[dict[str, Any]]) -> str:
    """A list's ETag from who asked, the total and each item's id and version."""
    digest = hashlib.blake2b(f"{actor}|{total}".encode(), digest_size=16)
    for item in items:
        digest.update(item["_id"].bytes)
        digest.update(item.get("version", 0).to_bytes(8, "big"))
    return f'"l-{digest.hexdigest()}"'


def _db(request: web.Request) -> AsyncDatabase[dict[str, Any]]:
    return request.app[client_key][request.app[db_name_key]]


def _json(value: Any, headers: dict[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(value, default=str).encode(), status=status,
                        content_type="application/json", headers=headers)


def _visible(document: dict[str, Any], actor: uuid.UUID) -> bool:
    return document["actor"] == actor or actor in document["participants"]


async def get_one(request: web.Request) -> web.Response:
    """find_one by _id; with If-None-Match, the version first."""
    trainings = _db(request).trainings
    training_id = uuid.UUID(request.match_info["training_id"])
    actor = uuid.UUID(request.query["actor"])
    if (tags := request.headers.get("If-None-Match")) is not None:
        head = await trainings.find_one({"_id": training_id}, {"version": 1, "actor": 1, "participants": 1})
        if head is None:
            raise web.HTTPNotFound()
        if not _visible(head, actor):
            raise web.HTTPForbidden()
        if (tag := f'"{head["version"]}"') in tags:
            return web.Response(status=304, headers={"ETag": tag})
    document = await trainings.find_one({"_id": training_id})
    if document is None:
        raise web.HTTPNotFound()
    if not _visible(document, actor):
        raise web.HTTPForbidden()
    return _json(document, {"ETag": f'"{document["version"]}"'})


async def _page(request: web.Request, actor: uuid.UUID,
                projection: dict[str, int] | None) -> tuple[list[dict[str, Any]], int]:
    """The service's list query: a sorted page, counted only when it is full."""
    trainings = _db(request).trainings
    items = await trainings.find({"actor": actor}, projection).sort(ORDER).limit(LIMIT).to_list()
    if len(items) < LIMIT:
        return items, len(items)
    counted = await _db(request).command({"count": "trainings", "query": {"actor": actor}},
                                         codec_options=trainings.codec_options)
    total = int(counted["n"])
    return items, total


async def get_list(request: web.Request) -> web.Response:
    """find by actor, newest first, 100 documents and the count; with If-None-Match, the versions first."""
    actor = uuid.UUID(request.query["actor"])
    if (tags := request.headers.get("If-None-Match")) is not None:
        versions, total = await _page(request, actor, VERSION_PROJECTION)
        if (tag := list_etag(actor, total, versions)) in tags:
            return web.Response(status=304, headers={"ETag": tag, "X-Total-Count": str(total)})
    items, total = await _page(request, actor, None)
    return _json(items, {"ETag": list_etag(actor, total, items), "X-Total-Count": str(total)})


async def post_one(request: web.Request) -> web.Response:
    """The store operations of a creation whose model is in use: find, check, clone, insert."""
    db = _db(request)
    body = await request.json()
    actor, model_id = uuid.UUID(body["actor"]), uuid.UUID(body["model_id"])
    model = await db.models.find_one({"_id": model_id})
    if model is None:
        raise web.HTTPBadRequest(text="unknown model")
    if model["owner"] != actor:
        raise web.HTTPForbidden()
    training_id = uuid.uuid4()
    clone = None
    if await db.trainings.find_one({"model": model_id}, {"_id": 1}) is not None:
        clone = clone_document(model, training_id)
        await db.models.insert_one(clone)
    await db.trainings.insert_one(
        training_document(actor, model_id if clone is None else clone["_id"], body["target_num_updates"],
                          training_id))
    return _json({"training_id": str(training_id)}, {"Location": f"/trainings/{training_id}"}, 201)


def create_app(url: str, db_name: str) -> web.Application:
    """The baseline app."""
    app = web.Application()

    async def mongo(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = AsyncMongoClient(url, uuidRepresentation="standard", tz_aware=True)
        yield
        await app[client_key].close()

    app[db_name_key] = db_name
    app.cleanup_ctx.append(mongo)
    app.router.add_get("/trainings/{training_id}", get_one)
    app.router.add_get("/trainings", get_list)
    app.router.add_post("/trainings", post_one)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--db", default="fltraining")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.url, args.db), host="127.0.0.1", port=args.port, print=None, access_log=None)
