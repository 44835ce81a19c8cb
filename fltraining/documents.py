"""Beanie documents: the stored shape of users, models and trainings."""

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, ClassVar
from uuid import UUID, uuid4

import pymongo
from beanie import Document, Insert, Replace, Save, SaveChanges, before_event
from pydantic import Field, WithJsonSchema
from pymongo import IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.results import InsertManyResult

from fltraining.clock import utcnow
from fltraining.jsonschema import inline_refs
from fltraining.options import TrainingOptions, daisy_chained_target
from fltraining.states import AggregationMethod, TrainingState, UncertaintyMethod


class User(Document):
    """A person or client machine; secrets are stored only as hashes."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    username: str = Field(min_length=1, max_length=150)
    email: str = Field(default="", max_length=254)
    first_name: str = Field(default="", max_length=150)
    last_name: str = Field(default="", max_length=150)
    actor: bool = False
    client: bool = False
    message_endpoint: str | None = Field(default=None, max_length=2048)
    password_hash: str = Field(min_length=1)
    token_hash: str = Field(min_length=64, max_length=64)
    token_expires_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)

    def token_expired(self, now: datetime) -> bool:
        """Whether the token's lifetime has run out."""
        return self.token_expires_at is not None and self.token_expires_at <= now

    class Settings:
        name = "users"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("username", unique=True, name="username_unique"),
            IndexModel("token_hash", unique=True, name="token_hash_unique"),
        ]


class Model(Document):
    """Metadata of a global model; its bytes live in GridFS under `file_id`."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    name: str = Field(max_length=256)
    description: str = Field(default="", max_length=10_000)
    owner: UUID
    round: int = Field(default=0, ge=0)
    input_shape: list[int | None] | None = None
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    file_id: UUID  # GridFS file id; a clone shares its original's file
    cloned_from: UUID | None = None
    # Set while a clone waits for its training's insert; a crash in between leaves it for the sweeper.
    pending_training: UUID | None = None
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "models"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("owner", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)], name="owner_created"),
            IndexModel("file_id", name="file_id"),
            IndexModel("pending_training", name="pending_training", sparse=True),
        ]


class Training(Document):
    """A federated training: one global model, an actor, participants and a state."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    model: UUID
    actor: UUID
    participants: list[UUID] = Field(default_factory=list)
    state: TrainingState = TrainingState.INITIAL
    base_target_num_updates: int = Field(ge=1, le=1_000_000)
    target_num_updates: int = Field(ge=1)
    last_update: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    uncertainty_method: UncertaintyMethod = UncertaintyMethod.NONE
    aggregation_method: AggregationMethod = AggregationMethod.FED_AVG
    # Stored exactly as sent (no defaults filled in); the validator still types known keys.
    options: Annotated[dict[str, Any], WithJsonSchema(inline_refs(TrainingOptions.model_json_schema()))] = Field(
        default_factory=dict
    )
    metric_names: list[str] = Field(default_factory=list)
    locked: bool = False
    state_detail: dict[str, Any] | None = None
    version: int = Field(default=1, ge=1)

    class Settings:
        name = "trainings"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("model", unique=True, name="model_unique"),
            IndexModel([("actor", pymongo.ASCENDING), ("last_update", pymongo.DESCENDING)], name="actor_last_update"),
            IndexModel([("participants", pymongo.ASCENDING), ("last_update", pymongo.DESCENDING)], name="participants_last_update"),
            IndexModel([("state", pymongo.ASCENDING), ("aggregation_method", pymongo.ASCENDING)], name="state_aggregation"),
            IndexModel("uncertainty_method", name="uncertainty_method"),
        ]

    @before_event(Insert, Replace, Save, SaveChanges)
    def apply_daisy_chain(self) -> None:
        """The seed's post_save rule, derived from the requested target so it cannot apply twice."""
        self.target_num_updates = daisy_chained_target(
            self.base_target_num_updates, self.options.get("daisy_chain_period")
        )

    @classmethod
    async def insert_many(  # type: ignore[override]
        cls,
        documents: Iterable["Training"],
        session: AsyncClientSession | None = None,
        **pymongo_kwargs: Any,
    ) -> InsertManyResult:
        """Bulk insert that still applies the daisy-chain rule (Beanie's fires no events)."""
        documents = list(documents)
        for document in documents:
            document.apply_daisy_chain()
        return await super().insert_many(documents, session=session, **pymongo_kwargs)


class LoginFailures(Document):
    """Failed logins from one address in one time window (shared by every service process)."""

    id: str = Field(max_length=200)  # type: ignore[assignment]  # "<address>@<window start>"
    failures: int = Field(ge=1)
    expires_at: datetime

    class Settings:
        name = "login_failures"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("expires_at", expireAfterSeconds=0, name="expires_at_ttl"),
        ]


class MetricsSnapshot(Document):
    """One service process's cumulative request metrics, so /metrics can sum every process."""

    id: str = Field(max_length=200)  # type: ignore[assignment]  # "<host>:<pid>:<random>"
    series: list[dict[str, Any]]
    updated_at: datetime
    expires_at: datetime

    class Settings:
        name = "service_metrics"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("expires_at", expireAfterSeconds=0, name="expires_at_ttl"),
        ]


DOCUMENT_MODELS: list[type[Document]] = [User, Model, Training, LoginFailures, MetricsSnapshot]
