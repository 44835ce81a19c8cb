"""A bare aiohttp server doing the one PyMongo call each benchmarked endpoint needs (the baseline)."""

import argparse
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient

client_key = web.AppKey("client", AsyncMongoClient[dict[str, Any]])
db_name_key = web.AppKey("db_name", str)


def _jsonable(document: dict[str, Any]) -> dict[str, Any]:
    """Enough conversion for json.dumps."""
    return json.loads(json.dumps(document, default=str))


async def get_one(request: web.Request) -> web.Response:
    """find_one by _id."""
    db = request.app[client_key][request.app[db_name_key]]
    document = await db.trainings.find_one({"_id": uuid.UUID(request.match_info["training_id"])})
    return web.json_response(_jsonable(document or {}))


async def get_list(request: web.Request) -> web.Response:
    """find by actor, newest first, 100 documents."""
    db = request.app[client_key][request.app[db_name_key]]
    actor = uuid.UUID(request.query["actor"])
    documents = await db.trainings.find({"actor": actor}).sort("last_update", -1).limit(100).to_list()
    return web.json_response([_jsonable(d) for d in documents])


async def post_one(request: web.Request) -> web.Response:
    """insert_one of a valid training document into the same validated, indexed collection."""
    db = request.app[client_key][request.app[db_name_key]]
    body = await request.json()
    now = datetime.now(UTC)
    training_id = uuid.uuid4()
    await db.trainings.insert_one({
        "_id": training_id, "model": uuid.uuid4(), "actor": uuid.UUID(body["actor"]), "participants": [],
        "state": "I", "base_target_num_updates": body["target_num_updates"],
        "target_num_updates": body["target_num_updates"], "last_update": now, "created_at": now,
        "uncertainty_method": "NONE", "aggregation_method": "FedAvg", "options": {}, "metric_names": [],
        "locked": False, "state_detail": None, "version": 1,
    })
    return web.json_response({"training_id": str(training_id)}, status=201)


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
