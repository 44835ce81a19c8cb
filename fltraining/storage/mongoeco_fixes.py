"""Corrections to fourteen faults of mongoeco 4.11.0, applied before the embedded store starts."""

import functools
import re
import sqlite3
import threading
import uuid
import weakref
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


# The inserts under way in this thread: (db, collection, documents), for `_keep_facts_left_true`.
_inserting = threading.local()
_ARRAY_FACTS = ("top_level_array:", "traverses_array:")


def _holds_array(value: Any) -> bool:
    """Whether a value is, or has inside its plain sub-documents, an array."""
    if isinstance(value, list | tuple):
        return True
    return isinstance(value, dict) and any(_holds_array(item) for item in value.values())


def _array_facts(cache: "_FactsCache", db_name: str, coll_name: str, documents: list[Any]) -> dict[Any, bool]:
    """The collection's cached array facts (held or awaiting a re-check), each mapped to whether `documents` may
    change it."""
    facts = {}
    for key in [*cache, *cache.awaiting]:
        if key[:2] == (db_name, coll_name) and key[2].startswith(_ARRAY_FACTS):
            top = key[2].split(":", 1)[1].split(".", 1)[0]
            facts[key] = any(_holds_array(document.get(top)) for document in documents)
    return facts


def _inserting_documents(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an engine insert so the cache invalidation it ends with knows what it inserted."""

    @functools.wraps(method)
    def inserting(self: Any, db_name: str, coll_name: str, documents: Any, *args: Any, **kwargs: Any) -> Any:
        batch = documents if isinstance(documents, list) else [documents]
        # mongoeco checks a batch's documents against facts cached before it: drop those an
        # array in the batch may falsify (the invalidation below keeps the others).
        cache = self._collection_features_cache
        for key, touched in _array_facts(cache, db_name, coll_name, batch).items():
            if touched:
                cache.pop(key, None)
                cache.awaiting.pop(key, None)
        previous = getattr(_inserting, "batch", None)
        _inserting.batch = (db_name, coll_name, batch)
        try:
            return method(self, db_name, coll_name, documents, *args, **kwargs)
        finally:
            _inserting.batch = previous

    return inserting


# The deletes under way in this thread: (db, collection), for `_keep_facts_left_true`.
_deleting = threading.local()


def _deleting_documents(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an engine delete so the cache invalidation it ends with knows it only removed documents."""

    @functools.wraps(method)
    def deleting(self: Any, db_name: str, coll_name: str, *args: Any, **kwargs: Any) -> Any:
        previous = getattr(_deleting, "collection", None)
        _deleting.collection = (db_name, coll_name)
        try:
            return method(self, db_name, coll_name, *args, **kwargs)
        finally:
            _deleting.collection = previous

    return deleting


# The documents this thread wrote since their collection's facts were last dropped: (db, collection) →
# storage keys, read when the write drops them (`_keep_facts_left_true`). A document write in a form not
# recognised here clears every collection's facts at once instead.
_written = threading.local()
# While set, the re-check of a fact (`_FactsCache`): the storage keys every feature query is limited to.
_restricting = threading.local()
_DOCUMENT_WRITE = re.compile(r"\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?)\s+documents\b",
                             re.IGNORECASE)
_INSERT_DOCUMENT = "INSERT INTO documents (db_name, coll_name, storage_key, document)"
_UPDATE_BY_KEY = "WHERE db_name = ? AND coll_name = ? AND storage_key = ?"
_FEATURE_SCOPE = "WHERE db_name = ? AND coll_name = ?"
MAX_RECHECKED_DOCUMENTS = 200  # a larger write drops the facts, as mongoeco does


class _Unrestrictable(Exception):
    """A feature query this module cannot limit to the written documents."""


def _written_by(sql: str, params: Any) -> tuple[str, str, str] | None:
    """The (db, collection, storage key) of a document write in a form mongoeco 4.11 uses, else None."""
    statement = sql.strip()
    if not isinstance(params, tuple | list):
        return None
    if statement.startswith(_INSERT_DOCUMENT):
        return params[0], params[1], params[2]
    if statement.startswith("UPDATE documents") and statement.endswith(_UPDATE_BY_KEY):
        if "SET document = ?, storage_key = ?" in statement:
            return params[2], params[3], params[1]
        return params[-3], params[-2], params[-1]
    return None


def _record_document_write(sql: str, params: Any) -> None:
    """Note a document write of this thread for the invalidation that follows it."""
    written = _written_by(sql, params)
    if written is None:
        _written.unknown = True  # the next invalidation drops every collection's facts
        return
    keys = getattr(_written, "keys", None)
    if keys is None:
        keys = _written.keys = {}
    keys.setdefault(written[:2], set()).add(written[2])


def _restricted(sql: str, params: Any, keys: list[str]) -> tuple[str, Any]:
    """A feature query limited to the given documents (raises _Unrestrictable when its form is unknown)."""
    at = sql.find(_FEATURE_SCOPE)
    if at < 0 or "FROM documents" not in sql[:at] or not sql.lstrip().upper().startswith("SELECT") or not isinstance(
            params, tuple | list) or len(params) < 2:
        raise _Unrestrictable(sql)
    end = at + len(_FEATURE_SCOPE)
    marks = ", ".join("?" for _ in keys)
    return f"{sql[:end]} AND storage_key IN ({marks}){sql[end:]}", (*params[:2], *keys, *params[2:])


# The cached facts a write may keep after checking its own documents, by kind: how to ask for one again.
_RECHECKED: dict[str, Callable[[Any, str, str, str], Any]] = {
    "comparison_mismatch": lambda engine, db, coll, rest: engine._field_has_comparison_type_mismatch_in_collection(
        db, coll, *rest.rsplit(":", 1)),
    "scalar_or_array_comparison_mismatch": lambda engine, db, coll, rest: (
        engine._field_has_scalar_or_array_element_type_mismatch_in_collection(db, coll, *rest.rsplit(":", 1))),
    "traverses_array": lambda engine, db, coll, rest: engine._field_traverses_array_in_collection(db, coll, rest),
    "traverses_dbref": lambda engine, db, coll, rest: engine._field_traverses_dbref_in_collection(db, coll, rest),
    "tagged_type": lambda engine, db, coll, rest: engine._field_contains_tagged_value_type_in_collection(
        db, coll, *rest.rsplit(":", 1)),
    "top_level_array": lambda engine, db, coll, rest: engine._field_is_top_level_array_in_collection(db, coll, rest),
    "contains_real_numeric": lambda engine, db, coll, rest: engine._field_contains_real_numeric_in_collection(
        db, coll, rest),
    "contains_non_ascii_text": lambda engine, db, coll, rest: engine._field_contains_non_ascii_text_in_collection(
        db, coll, rest),
}


class _FactsCache(dict[Any, Any]):
    """An engine's features cache whose "no document has it" facts a write may have falsified wait, with the
    storage keys written since, until a query needs one: it is then asked again of those documents alone (the
    same query, limited to their storage keys). mongoeco reads the cache only through `in` and `[]`."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self._engine = weakref.ref(engine)
        self.awaiting: dict[Any, set[str]] = {}

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        keys = self.awaiting.pop(key, None)
        engine = self._engine()
        if keys is None or engine is None:
            return False
        value = self._asked_again(engine, key, keys)
        if value is None:
            return False
        self[key] = value
        return True

    def clear(self) -> None:
        """Drop every fact, awaiting ones too."""
        super().clear()
        self.awaiting.clear()

    def await_recheck(self, key: Any, keys: set[str]) -> None:
        """Set a fact aside until needed, with the documents written since it held (too many: dropped)."""
        held = self.awaiting.setdefault(key, set())
        held |= keys
        if len(held) > MAX_RECHECKED_DOCUMENTS:
            del self.awaiting[key]

    def forget(self, db_name: str | None, coll_name: str | None) -> None:
        """Drop the awaiting facts of one collection (of all without a name)."""
        for key in [key for key in self.awaiting if db_name is None or key[:2] == (db_name, coll_name)]:
            del self.awaiting[key]

    def _asked_again(self, engine: Any, key: Any, keys: set[str]) -> bool | None:
        """The fact as the written documents alone answer it: False (still none has it), True (one of them has
        it, so the collection does), None (not known here: mongoeco scans the collection for it)."""
        kind, _, rest = key[2].partition(":")
        ask = _RECHECKED.get(kind)
        if ask is None:
            return None
        before = set(dict.keys(self))
        previous = getattr(_restricting, "keys", None)
        _restricting.keys = sorted(keys)
        try:
            holds = ask(engine, key[0], key[1], rest)
        except Exception:  # noqa: BLE001  (any failure: the fact is dropped, as mongoeco drops it)
            holds = None
        finally:
            _restricting.keys = previous
            for added in set(dict.keys(self)) - before:  # answers about the written documents only
                dict.pop(self, added, None)
        return holds if isinstance(holds, bool) else None


def _facts_cache_awaiting_rechecks(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the engine's constructor so its features cache is a `_FactsCache`."""

    @functools.wraps(init)
    def initialised(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._cache_state.collection_features_cache = _FactsCache(self)

    return initialised


def _keep_facts_left_true(invalidate: Callable[..., None]) -> Callable[..., None]:
    """Wrap the features-cache invalidation so writes keep the facts they leave true."""

    @functools.wraps(invalidate)
    def invalidated(self: Any, db_name: str | None = None, coll_name: str | None = None) -> None:
        cache = self._collection_features_cache
        if getattr(_written, "unknown", False):
            _written.unknown = False
            _written.keys = {}
            invalidate(self)  # a document write of a form not known here: every collection's facts go
            return
        if db_name is not None and getattr(_deleting, "collection", None) == (db_name, coll_name):
            # Every cached fact of mongoeco 4.11 is "some document has feature F" (arrays, tagged
            # types, type mismatches, non-ASCII text, reals) or a uniform sort type; False says "none
            # has it" (or "not uniform", which only disables a fast path). Removing documents cannot
            # add a feature, so the False facts stay true (and the awaiting ones wait on); without
            # this, each GridFS delete made the next query decode every chunk of the bucket to rebuild them.
            kept = {key: False for key, value in cache.items() if key[:2] == (db_name, coll_name) and value is False}
            invalidate(self, db_name, coll_name)
            cache.update(kept)
            return
        # Every write drops the collection's cached facts, so the next query re-runs a full-table
        # scan per fact it needs (each settling of a notification made the next read of the
        # outbox scan every record kept for the retention period). A fact "no document has F"
        # stays true after a write whose documents do not have F: an insert's arrays are looked
        # at in Python; every other fact waits, with the written storage keys, until a query needs
        # it (`_FactsCache`); everything else is dropped as before.
        written = getattr(_written, "keys", None) or {}
        keys = written.pop((db_name, coll_name), set()) if db_name is not None else set()
        if db_name is None or coll_name is None or not keys or self._transaction_owner_session_id is not None:
            cache.forget(db_name, coll_name)
            invalidate(self, db_name, coll_name)
            return
        batch = getattr(_inserting, "batch", None)
        untouched: set[Any] = set()
        if batch is not None and batch[:2] == (db_name, coll_name):
            untouched = {key for key, touched in _array_facts(cache, *batch).items() if not touched}
        kept = {}
        for key, value in cache.items():
            if key[:2] != (db_name, coll_name) or value is not False:
                continue
            # "Not one sort type" only disables a fast path: a write cannot make it wrong.
            if key in untouched or key[2].startswith("uniform_scalar_sort_type:"):
                kept[key] = False
            else:
                cache.await_recheck(key, keys)
        for key in [key for key in cache.awaiting if key[:2] == (db_name, coll_name) and key not in untouched]:
            cache.await_recheck(key, keys)
        invalidate(self, db_name, coll_name)
        cache.update(kept)

    return invalidated


def _unique_key_via_index(method: Callable[..., bool | None]) -> Callable[..., bool | None]:
    """Wrap the scalar-entry unique check so compound and numeric keys use the physical index too."""
    from mongoeco.core.bson_scalars import is_bson_numeric, unwrap_bson_numeric
    from mongoeco.engines.sqlite_query import index_expressions_sql
    from mongoeco.engines.virtual_indexes import document_in_virtual_index
    from mongoeco.types import is_object_id_like, normalize_object_id

    numeric = [
        ("{t} IN ('', 'int32', 'int64', 'double') AND {v} = ?", True),
        ("{t} IN ('decimal', 'decimal128', 'decimal128_public')", False),
    ]

    def key_terms(value: Any) -> list[tuple[str, list[Any]]] | None:
        # SQL terms that together match (at least) every stored value equal to `value` for
        # mongoeco's bson_equality_key; None for types this cannot bound (they keep the scan).
        if type(value) is str:
            return [("{t} = '' AND {v} = ?", [value])]
        if isinstance(value, uuid.UUID):
            return [("{t} = 'uuid' AND {v} = ?", [str(value)])]
        if is_object_id_like(value):
            return [("{t} = 'objectid' AND {v} = ?", [str(normalize_object_id(value))])]
        number = unwrap_bson_numeric(value) if is_bson_numeric(value) else None
        if isinstance(number, int) and abs(number) <= 2**53:  # so exact against doubles too
            return [(term, [int(number)] if bound else []) for term, bound in numeric]
        return None

    @functools.wraps(method)
    def checked(self: Any, conn: Any, collection_id: int | None, index: Any, document: Any, **kwargs: Any) -> bool | None:
        found = method(self, conn, collection_id, index, document, **kwargs)
        if found is not None or collection_id is None or not index.get("physical_name"):
            return found
        # mongoeco only reaches here for indexes without collation whose fields hold no array in
        # the collection, and then decodes every stored document to compare keys (O(n) per insert,
        # all model bytes for GridFS chunks). Find the candidates through the index's own
        # expression index instead (one fully indexed SELECT per combination of terms), and
        # compare them exactly as that scan does.
        alternatives: list[tuple[str, list[Any]]] = [("", [])]
        for field in index["fields"]:
            if "." in field or field not in document:
                return None
            terms = key_terms(document[field])
            if terms is None:
                return None
            type_sql, value_sql = index_expressions_sql(field)
            alternatives = [
                (sql + " AND " + term.format(t=type_sql, v=value_sql), params + term_params)
                for sql, params in alternatives
                for term, term_params in terms
            ]
        names = conn.execute(
            "SELECT db_name, coll_name FROM collections WHERE collection_id = ?", (collection_id,)
        ).fetchone()
        if names is None:
            return None
        exclude = kwargs.get("exclude_storage_key")
        key = tuple(self._index_value(document, field) for field in index["fields"])
        for sql, params in alternatives:
            query = "SELECT storage_key, document FROM documents WHERE db_name = ? AND coll_name = ?" + sql
            for storage_key, payload in conn.execute(query, (*names, *params)):
                if storage_key == exclude:
                    continue
                existing = self._deserialize_document(payload)
                if document_in_virtual_index(existing, index) and key == tuple(
                    self._index_value(existing, field) for field in index["fields"]
                ):
                    return True
        return False

    return checked


def _immutable_values_copied_as_themselves() -> None:
    """Let `copy.deepcopy` return UUIDs and datetimes as they are, as it does for str and int.

    mongoeco deep-copies a document before every update and again for the mutation outcome; both
    types are immutable, but `deepcopy` rebuilds each through `__reduce_ex__` (`_reconstruct`), which
    took half of an update's CPU for a document holding 2,000 UUIDs (410 ms per `$inc` on a training
    of 1,000 participants). Upstream: register them as atomic in mongoeco's copy helper (or copy
    documents with a codec-aware copier that skips immutable scalars).
    """
    import copy
    import datetime

    for kind in (uuid.UUID, datetime.datetime, datetime.date):
        copy._deepcopy_dispatch[kind] = copy._deepcopy_atomic  # type: ignore[attr-defined]


def _id_through_storage_key(translate: Callable[..., tuple[str, list[Any]]]) -> Callable[..., tuple[str, list[Any]]]:
    """Wrap the read translation so a filter fixing `_id` to a UUID, ObjectId or string reads one row by its key."""
    from mongoeco.core.query_plan import AndCondition, EqualsCondition
    from mongoeco.types import is_object_id_like

    def fixed_id(plan: Any) -> Any:
        if isinstance(plan, EqualsCondition) and plan.field == "_id" and (
                isinstance(plan.value, uuid.UUID) or is_object_id_like(plan.value) or type(plan.value) is str):
            return plan.value
        if isinstance(plan, AndCondition):
            return next((value for clause in plan.clauses if (value := fixed_id(clause)) is not None), None)
        return None

    @functools.wraps(translate)
    def translated(self: Any, db_name: str, coll_name: str, plan: Any) -> tuple[str, list[Any]]:
        sql, params = translate(self, db_name, coll_name, plan)
        value = fixed_id(plan)
        if value is None:
            return sql, params
        # mongoeco matches `_id` with json_extract on every document of the collection: each read of
        # one training by id parsed every stored training, each settling of a notification every stored
        # record. The primary key holds the id's canonical form; for UUIDs, ObjectIds and strings (no
        # numeric equivalents, and a collation sends a query to the Python path before it gets here) it
        # is equal exactly when `_id` is, so the added term only lets SQLite seek to the row.
        return f"documents.storage_key = ? AND ({sql})", [self._storage_key(value), *params]

    return translated


def _multikey_membership_seeking(self: Any, collection_id: int, db_name: str, coll_name: str, index: Any,
                                 signatures: tuple[tuple[str, str], ...]) -> tuple[str, list[object]]:
    """The multikey membership test, constrained on every column of the entry index so that it seeks."""
    # mongoeco asked for `element_type`, which the index (collection, index, type_score, element_key,
    # storage_key) does not hold, so SQLite walked every entry of the index for every document
    # tested: confirming one upload to a training of 1,000 participants read the 1,000 entries of
    # `participants` and of `round_participants`, with 1,000 trainings stored a million.
    # `type_score` is a function of `element_type` (`_multikey_type_score`, as the entries are
    # written), so the added term selects nothing else; `element_type` is still checked.
    physical_name = self._quote_identifier(str(index["multikey_physical_name"]))
    clauses: list[str] = []
    params: list[object] = []
    for element_type, element_key in signatures:
        clauses.append(f"EXISTS (SELECT 1 FROM multikey_entries INDEXED BY {physical_name} "
                       "WHERE collection_id = ? AND index_name = ? AND type_score = ? AND element_key = ? "
                       "AND storage_key = documents.storage_key AND element_type = ?)")
        params.extend([collection_id, index["name"], self._multikey_type_score(element_type),
                       element_key, element_type])
    return "(" + " OR ".join(clauses) + ")", params


def _multikey_entries_kept(rebuild: Callable[..., None]) -> Callable[..., None]:
    """Wrap the rebuild of a document's multikey index entries so entries an update left as they are stay."""

    @functools.wraps(rebuild)
    def rebuilt(self: Any, conn: Any, db_name: str, coll_name: str, storage_key: str, document: Any,
                indexes: Any) -> None:
        # mongoeco deletes and re-inserts every multikey entry of a document on each update, whatever it
        # changed: a `$set` of a training's round rewrote the 4,000 entries its participant lists give the
        # indexes over them (two thirds of the update's CPU at 1,000 participants). When the entries the new
        # document gives are the stored ones, there is nothing to rewrite.
        collection_id = self._lookup_collection_id(conn, db_name, coll_name)
        if collection_id is not None:
            wanted = set(self._build_multikey_rows_for_document(storage_key, document, indexes))
            stored = set(conn.execute(
                "SELECT index_name, element_type, type_score, element_key FROM multikey_entries "
                "WHERE collection_id = ? AND storage_key = ?", (collection_id, storage_key)))
            if wanted == stored:
                return
        rebuild(self, conn, db_name, coll_name, storage_key, document, indexes)

    return rebuilt


# Hubs whose committed changes are not yet delivered to them, with a runtime that can deliver them.
_undelivered: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _deliver_when_watched(dispatch: Callable[..., None]) -> Callable[..., None]:
    """Wrap a collection's change delivery so it waits while no change stream watches its hub."""

    @functools.wraps(dispatch)
    def delivered(self: Any, operation_context: Any = None) -> None:
        hub = self._collection._change_hub
        if hub is not None and not hub.should_publish_events():
            # mongoeco delivers every committed write to the client's change hub at once: a lease row
            # written and committed, a heartbeat thread started and joined, the outbox read, the lease
            # released (a third of an insert's CPU, per deleted document for a delete_many), on the
            # event loop, for a hub nobody reads (the wire server refuses `$changeStream`). The outbox
            # keeps the changes (bounded, in sequence) and the hub's tokens follow that sequence, so
            # delivering them when a stream opens gives it the same history.
            _undelivered[hub] = self
            return
        if hub is not None:
            _undelivered.pop(hub, None)
        dispatch(self, operation_context)

    return delivered


def _no_gap_records(new_context: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a collection's operation contexts so a write no change stream sees records no change."""
    from mongoeco.core.operation_context import ChangePublicationPolicy

    @functools.wraps(new_context)
    def created(self: Any, *args: Any, **kwargs: Any) -> Any:
        # With no stream watching, mongoeco records a "gap" for every written document (so a stream that
        # resumes across it can tell it missed changes): the document copied and serialised, an identity
        # looked up and written, an outbox row written, the outbox compacted; eight statements in the
        # write's transaction. A stream can only watch through the embedded store's wire server, which
        # refuses `$changeStream`: nobody can resume, so there is nothing to mark.
        if kwargs.get("publication") is ChangePublicationPolicy.RECORD_GAP:
            kwargs["publication"] = ChangePublicationPolicy.DISABLED
        return new_context(self, *args, **kwargs)

    return created


# Documents one delete job removes at most: a job holds the store's one writer, so a huge `delete_many`
# still lets other clients' commands in between its jobs.
DELETE_JOB_DOCUMENTS = 500


def _delete_stored_sync(engine: Any, db_name: str, coll_name: str, plan: Any, dialect: Any, variables: Any,
                        session: Any, storage_keys: list[str]) -> int:
    """Delete, in one transaction, the documents under these storage keys that still match the plan."""
    from mongoeco.core.filtering import QueryEngine
    from mongoeco.engines._sqlite_write_scope import sqlite_write_scope

    deleted = 0
    with engine._lock:
        conn = engine._require_connection(session)
        with engine._bind_connection(conn), sqlite_write_scope(
                conn, begin_write=lambda current: engine._begin_write(current, session),
                commit_write=lambda current: engine._commit_write(current, session),
                rollback_write=lambda current: engine._rollback_write(current, session)):
            for storage_key in storage_keys:
                document = engine._load_existing_document_for_storage_key(conn, db_name, coll_name, storage_key)
                # Matched before this transaction: a document changed since may no longer match.
                if document is None or not QueryEngine.match_plan(document, plan, dialect=dialect,
                                                                  variables=variables):
                    continue
                conn.execute("DELETE FROM documents WHERE db_name = ? AND coll_name = ? AND storage_key = ?",
                             (db_name, coll_name, storage_key))
                engine._delete_document_index_entries(conn, db_name, coll_name, storage_key)
                deleted += 1
            if deleted:
                engine._invalidate_collection_features_cache(db_name, coll_name)
    return deleted


def _deleting_in_one_job(delete_many: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `delete_many` so the documents it matched are deleted by one store job and one transaction (per
    DELETE_JOB_DOCUMENTS)."""
    from mongoeco.api._async import _collection_modify as modify
    from mongoeco.api.public_api import ARG_UNSET
    from mongoeco.core.expression_context import ExpressionExecutionContext
    from mongoeco.core.query_plan import ensure_query_plan
    from mongoeco.engines.sqlite import SQLiteEngine
    from mongoeco.types import DeleteResult

    # Marked as a delete, so the features cache keeps the facts removing documents leaves true.
    deleting_stored = _deleting_documents(_delete_stored_sync)

    @functools.wraps(delete_many)
    async def deleted(collection: Any, filter_spec: Any, *, filter: Any, collation: Any, hint: Any, comment: Any,
                      let: Any, session: Any, extra_kwargs: dict[str, object], server_command: bool = False) -> Any:
        engine = collection._engine
        # mongoeco deleted each matched document by a job of its own: the filter compiled again, the
        # document read again, a transaction begun and committed, each job queued behind every other
        # client's commands. A round's clean-up of 100 updates took 100 turns of the store's one worker
        # while 100 uploads were queued, and fell behind the rounds (six rounds behind after twenty).
        # Only the plain case takes the one-job path; a transaction, a collation, a hint, `let` variables
        # or a change stream watching keeps mongoeco's own.
        plain_let = let is None or (isinstance(let, ExpressionExecutionContext) and not let.bindings)
        if (getattr(session, "in_transaction", False) or collation is not None or hint is not None or not plain_let
                or filter is not ARG_UNSET or extra_kwargs or not isinstance(engine, SQLiteEngine)
                or collection._should_publish_change_events(session=session)):
            return await delete_many(collection, filter_spec, filter=filter, collation=collation, hint=hint,
                                     comment=comment, let=let, session=session, extra_kwargs=extra_kwargs,
                                     server_command=server_command)
        operation = modify.compile_update_operation(
            collection._normalize_filter(filter_spec), collation=None, hint=None, comment=comment,
            let=collection._normalize_let(let), dialect=collection._mongodb_dialect,
            planning_mode=collection._planning_mode)
        operation = modify._bind_execution_context(operation, collection, session=session,
                                                   change_operation_type="delete")
        matched = await collection._build_cursor(
            modify.compile_find_selection_from_update_operation(operation), session=session, apply_codec_options=False,
        ).to_list()
        plan = ensure_query_plan(operation.filter_spec, operation.plan, dialect=operation.dialect)
        keys = [engine._storage_key(modify._selected_document_id(document)) for document in matched]
        count = 0
        for start in range(0, len(keys), DELETE_JOB_DOCUMENTS):
            count += await engine._run_blocking(
                deleting_stored, engine, collection._db_name, collection._collection_name, plan, operation.dialect,
                operation.let, session, keys[start:start + DELETE_JOB_DOCUMENTS])
        collection._record_operation_metadata(operation="delete_many", comment=operation.comment, hint=None,
                                              session=session)
        return DeleteResult(deleted_count=count)

    return deleted


def _drain_before_watching(init: Callable[..., None], dispatch: Callable[..., None]) -> Callable[..., None]:
    """Wrap a change stream cursor's start so it first receives the changes delivery held back."""

    @functools.wraps(init)
    def started(self: Any, hub: Any, *args: Any, **kwargs: Any) -> None:
        runtime = _undelivered.pop(hub, None)
        if runtime is not None:
            dispatch(runtime)
        init(self, hub, *args, **kwargs)

    return started


# mongoeco gives every single-field and every array index its own SQLite index over the shared entry
# table, each with the same five columns: fltraining's 21 scalar indexes wrote each scalar entry into 21 B-trees.
# One index over each table answers every lookup (each names its collection and index first).
ENTRY_TABLES = {"scidx": "scalar_index_entries", "mkidx": "multikey_entries"}
ENTRY_COLUMNS = "(collection_id, index_name, type_score, element_key, storage_key)"
SHARED_ENTRY_INDEX = {prefix: f"{table}_shared" for prefix, table in ENTRY_TABLES.items()}
_PER_INDEX_NAME = re.compile(r'"?\b(scidx|mkidx)_[0-9a-f]+\b"?')
_CREATE_PER_INDEX = re.compile(r'\s*CREATE INDEX (?:IF NOT EXISTS )?"?\b(scidx|mkidx)_[0-9a-f]+\b"?\s+ON\s+(\w+)\s*'
                               + re.escape(ENTRY_COLUMNS) + r"\s*$")


def shared_entry_index_sql(sql: str) -> str:
    """The statement with every per-index entry index replaced by its table's one shared index."""
    if "idx_" not in sql:  # the common case, decided without a regular expression
        return sql
    if (created := _CREATE_PER_INDEX.match(sql)) is not None and ENTRY_TABLES[created[1]] == created[2]:
        return f"CREATE INDEX IF NOT EXISTS {SHARED_ENTRY_INDEX[created[1]]} ON {created[2]} {ENTRY_COLUMNS}"
    if sql.lstrip().upper().startswith("DROP INDEX"):
        return sql  # `DROP INDEX IF EXISTS` of a name that no longer exists: nothing to drop
    return _PER_INDEX_NAME.sub(lambda name: SHARED_ENTRY_INDEX[name[1]], sql)


def _with_shared_entry_indexes(execute: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a connection's `execute` so per-index entry indexes become the shared one, document writes are
    noted for the facts they leave true, and a fact's re-check reads only the written documents."""

    @functools.wraps(execute)
    def executed(self: Any, sql: str, *args: Any) -> Any:
        if (keys := getattr(_restricting, "keys", None)) is not None:
            sql, restricted = _restricted(sql, args[0] if args else (), keys)
            return execute(self, shared_entry_index_sql(sql), restricted, *args[1:])
        if _DOCUMENT_WRITE.match(sql):
            _record_document_write(sql, args[0] if args else ())
        return execute(self, shared_entry_index_sql(sql), *args)

    return executed


def share_entry_indexes(path: str) -> None:
    """Move a stored database to the shared entry indexes (before the store opens it; idempotent)."""
    connection = sqlite3.connect(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for prefix, table in ENTRY_TABLES.items():
            if table not in tables:
                continue
            connection.execute(f"CREATE INDEX IF NOT EXISTS {SHARED_ENTRY_INDEX[prefix]} ON {table} {ENTRY_COLUMNS}")
            for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND name LIKE ?",
                    (table, f"{prefix}_%")).fetchall():
                connection.execute(f'DROP INDEX "{name}"')
        connection.commit()
    finally:
        connection.close()


MAX_COMPILED_VALIDATORS = 256


def _validators_compiled_once(compile_validator: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the compilation of a collection's validator so each validator is compiled once."""
    compiled: dict[tuple[str, str | None], Any] = {}

    @functools.wraps(compile_validator)
    def once(options: dict[str, object] | None, *, dialect: Any = None) -> Any:
        # mongoeco compiled the `$jsonSchema` (deep copies and a check of the whole schema) on every
        # insert and update: a twentieth of the store's CPU in a round. The options are read from the
        # catalog each time, so they are keyed by their text; the compiled validator is immutable.
        key = (repr(options), None if dialect is None else dialect.key)
        if (found := compiled.get(key)) is None:
            found = compile_validator(options, dialect=dialect)
            if len(compiled) >= MAX_COMPILED_VALIDATORS:
                compiled.clear()
            compiled[key] = found
        return found

    return once


def apply() -> None:
    """Apply the corrections once; refuse any mongoeco release but the one they fit."""
    global _applied
    if _applied:
        return
    from mongoeco import _version

    if _version.__version__ != SUPPORTED_VERSION:
        raise UnsupportedMongoecoVersion(
            f"mongoeco {_version.__version__} is installed; fltraining's corrections are "
            f"written for {SUPPORTED_VERSION} only. Install mongoeco[wire]=={SUPPORTED_VERSION}."
        )
    from mongoeco._change_streams import cursor as change_cursor
    from mongoeco.api._async import _collection_runtime, collection
    from mongoeco.engines import memory, semantic_core, sqlite
    from mongoeco.wire import bson_bridge, protocol

    sqlite.SQLiteEngine._validate_document_against_unique_indexes = _numeric_id_only(
        sqlite.SQLiteEngine._validate_document_against_unique_indexes, lambda doc: doc.get("_id")
    )
    # Unique secondary indexes: keep "no array at F" facts across inserts, and look keys up
    # through the physical index rather than decoding every stored document.
    sqlite.SQLiteEngine._insert_document_sync = _inserting_documents(sqlite.SQLiteEngine._insert_document_sync)
    sqlite.SQLiteEngine._insert_documents_sync = _inserting_documents(sqlite.SQLiteEngine._insert_documents_sync)
    sqlite.SQLiteEngine._invalidate_collection_features_cache = _keep_facts_left_true(
        sqlite.SQLiteEngine._invalidate_collection_features_cache
    )
    sqlite.SQLiteEngine.__init__ = _facts_cache_awaiting_rechecks(sqlite.SQLiteEngine.__init__)
    # Deletes keep the "none has F" facts too.
    sqlite.SQLiteEngine._delete_document_sync = _deleting_documents(sqlite.SQLiteEngine._delete_document_sync)
    sqlite.SQLiteEngine._delete_matching_document_sync = _deleting_documents(
        sqlite.SQLiteEngine._delete_matching_document_sync
    )
    sqlite.SQLiteEngine._unique_index_conflict_via_scalar_entries = _unique_key_via_index(
        sqlite.SQLiteEngine._unique_index_conflict_via_scalar_entries
    )
    sqlite.SQLiteEngine._translate_query_plan_with_multikey = _id_through_storage_key(
        sqlite.SQLiteEngine._translate_query_plan_with_multikey
    )
    # An array membership test seeks its one index entry.
    sqlite.SQLiteEngine._translate_multikey_exists_clause = _multikey_membership_seeking
    sqlite.SQLiteEngine._rebuild_multikey_entries_for_document = _multikey_entries_kept(
        sqlite.SQLiteEngine._rebuild_multikey_entries_for_document
    )
    semantic_core.compile_collection_validation_semantics = _validators_compiled_once(
        semantic_core.compile_collection_validation_semantics)
    # One shared index per entry table instead of one identical index per MongoDB index; document
    # writes noted as they run, so that the features cache keeps what they leave true.
    connection_class = sqlite.SQLiteConnection
    connection_class.execute = _with_shared_entry_indexes(connection_class.execute)  # type: ignore[method-assign]
    # Change delivery only to a hub somebody watches.
    runtime = _collection_runtime.CollectionRuntimeCoordinator
    deliver = runtime._dispatch_engine_changes
    runtime._dispatch_engine_changes = _deliver_when_watched(deliver)
    for cursor in (change_cursor.AsyncChangeStreamCursor, change_cursor.ChangeStreamCursor):
        cursor.__init__ = _drain_before_watching(cursor.__init__, deliver)
    # A delete_many's documents deleted by one job, in one transaction.
    from mongoeco.api._async import _collection_modify

    _collection_modify.delete_many = _deleting_in_one_job(_collection_modify.delete_many)
    # No change recorded while no stream watches.
    collection_class = collection.AsyncCollection
    collection_class._new_operation_context = _no_gap_records(collection_class._new_operation_context)
    memory.MemoryEngine._ensure_unique_indexes = _numeric_id_only(
        memory.MemoryEngine._ensure_unique_indexes, lambda doc: doc.get("_id")
    )
    # Patch both names: protocol calls its imported copy, and the encoder recurses into nested
    # values (where every DBRef sits) through its own module's global.
    encoder = _encode_bson_dbref(bson_bridge.encode_wire_value)
    bson_bridge.encode_wire_value = encoder
    protocol.encode_wire_value = encoder
    _immutable_values_copied_as_themselves()
    _applied = True
