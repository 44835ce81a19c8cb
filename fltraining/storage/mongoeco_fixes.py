"""Corrections to two faults of mongoeco 4.11.0, applied before the embedded store starts."""

import functools
from collections.abc import Callable
from typing import Any

SUPPORTED_VERSION = "4.11.0"

_applied = False


class UnsupportedMongoecoVersion(RuntimeError):
    """The installed mongoeco is not the release these corrections were written for."""


def _numeric_id_only(method: Callable[..., None], id_of: Callable[[Any], Any]) -> Callable[..., None]:
    """Wrap a unique-index check so its full `_id` scan runs only for numeric ids."""
    from mongoeco.core.identity import id_contains_numeric_value

    @functools.wraps(method)
    def checked(self: Any, db_name: str, coll_name: str, document: Any, *args: Any, **kwargs: Any) -> None:
        # A full scan is only needed where 1, 1.0 and Int64(1) must collide; other ids
        # are found through their storage key, so the O(n) scan per insert is skipped.
        if kwargs.get("scan_payload_id") and not id_contains_numeric_value(id_of(document)):
            kwargs["scan_payload_id"] = False
        method(self, db_name, coll_name, document, *args, **kwargs)

    return checked


def _encode_bson_dbref(encode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap the wire encoder so PyMongo DBRefs get their id (e.g. a UUID) encoded too."""
    from bson.binary import STANDARD, Binary
    from bson.dbref import DBRef

    @functools.wraps(encode)
    def encoded(value: Any) -> Any:
        if isinstance(value, DBRef) and not isinstance(value.id, Binary):
            extras = {key: encoded(item) for key, item in value.as_doc().items() if key not in {"$ref", "$id", "$db"}}
            ident = encoded(value.id)
            if hasattr(ident, "bytes") and not isinstance(ident, Binary):
                ident = Binary.from_uuid(ident, STANDARD)
            return DBRef(value.collection, ident, database=value.database, **extras)
        return encode(value)

    return encoded


def apply() -> None:
    """Apply both corrections once; refuse any mongoeco release but the one they fit."""
    global _applied
    if _applied:
        return
    from mongoeco import _version

    if _version.__version__ != SUPPORTED_VERSION:
        raise UnsupportedMongoecoVersion(
            f"mongoeco {_version.__version__} is installed; fltraining's corrections are "
            f"written for {SUPPORTED_VERSION} only. Install mongoeco[wire]=={SUPPORTED_VERSION}."
        )
    from mongoeco.engines import memory, sqlite
    from mongoeco.wire import bson_bridge, protocol

    sqlite.SQLiteEngine._validate_document_against_unique_indexes = _numeric_id_only(
        sqlite.SQLiteEngine._validate_document_against_unique_indexes, lambda doc: doc.get("_id")
    )
    memory.MemoryEngine._ensure_unique_indexes = _numeric_id_only(
        memory.MemoryEngine._ensure_unique_indexes, lambda doc: doc.get("_id")
    )
    # Patch both names: protocol calls its imported copy, and the encoder recurses into nested
    # values (where every DBRef sits) through its own module's global.
    encoder = _encode_bson_dbref(bson_bridge.encode_wire_value)
    bson_bridge.encode_wire_value = encoder
    protocol.encode_wire_value = encoder
    _applied = True
