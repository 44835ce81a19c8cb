"""Conditional GETs: ETags for trainings and training lists, `If-None-Match` answered with 304."""

import hashlib
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from aiohttp import web

# Pollers (DLR's frontend asks every 10 s) revalidate instead of reusing a stale copy or refetching it.
REVALIDATE = {"Cache-Control": "private, no-cache"}


def list_etag(user: UUID, query: str, total: int, items: Iterable[dict[str, Any]]) -> str:
    """A list's ETag: who asked, what, how many in all, and each item's id and version on this page (every
    change of a training's public fields bumps its version)."""
    digest = hashlib.blake2b(f"{user}|{query}|{total}".encode(), digest_size=16)
    for item in items:
        digest.update(item["_id"])  # read raw (`reading_raw_uuids`): a BSON binary, i.e. the UUID's bytes
        digest.update(item.get("version", 0).to_bytes(8, "big"))
    return f'"l-{digest.hexdigest()}"'


def none_match(request: web.Request, etag: str) -> bool:
    """Whether `If-None-Match` names this ETag (or `*`): the client's copy is current (weak comparison)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def not_modified(etag: str, headers: dict[str, str] | None = None) -> web.Response:
    """304 with the validator and the headers a 200 would have carried."""
    return web.Response(status=304, headers={"ETag": etag, **REVALIDATE, **(headers or {})})
