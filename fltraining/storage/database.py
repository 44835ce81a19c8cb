"""Connecting to MongoDB: validators, indexes and Beanie initialisation."""

import logging
from typing import Any

from beanie import Document, init_beanie
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure
from pymongo.uri_parser import parse_uri

from fltraining.documents import DOCUMENT_MODELS
from fltraining.storage.validators import collection_validator

log = logging.getLogger(__name__)

COLLMOD_UNSUPPORTED = (59, 115)  # CommandNotFound, CommandNotSupported


def database_name(url: str, default: str) -> str:
    """The database named in a mongodb:// URL's path, or the default."""
    return parse_uri(url).get("database") or default


def make_client(url: str, listeners: list[monitoring.CommandListener] | None = None) -> AsyncMongoClient[dict[str, Any]]:
    """Create the async PyMongo client with the codec options fltraining relies on."""
    return AsyncMongoClient(url, uuidRepresentation="standard", tz_aware=True, connect=False,
                            event_listeners=listeners or [])


async def ensure_validator(database: AsyncDatabase[dict[str, Any]], document: type[Document]) -> None:
    """Create the collection with its `$jsonSchema` validator, or bring an existing one up to date."""
    name = document.Settings.name  # type: ignore[attr-defined]
    validator = collection_validator(document)
    existing = {info["name"]: info async for info in await database.list_collections(filter={"name": name})}
    if name not in existing:
        try:
            await database.create_collection(name, validator=validator, validationLevel="strict", validationAction="error")
            return
        except OperationFailure as error:
            if error.code != 48:  # NamespaceExists: another process created it first
                raise
        existing = {info["name"]: info async for info in await database.list_collections(filter={"name": name})}
    if existing[name].get("options", {}).get("validator") == validator:
        return
    try:
        await database.command("collMod", name, validator=validator, validationLevel="strict", validationAction="error")
    except OperationFailure as error:
        if error.code not in COLLMOD_UNSUPPORTED and "unsupported" not in str(error):
            raise
        log.warning("store cannot update the validator of %s (no collMod); keeping the old one", name)


async def init_database(database: AsyncDatabase[dict[str, Any]]) -> None:
    """Install validators, then let Beanie create the indexes and bind the documents."""
    for document in DOCUMENT_MODELS:
        await ensure_validator(database, document)
    await init_beanie(database=database, document_models=DOCUMENT_MODELS)
