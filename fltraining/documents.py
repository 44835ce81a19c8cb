"""Beanie documents: the stored shape of users, models and trainings."""

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, ClassVar
from uuid import UUID, uuid4

import pymongo
from beanie import Document, Insert, Replace, Save, SaveChanges, before_event
from pydantic import BaseModel, Field, WithJsonSchema
from pymongo import IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.results import InsertManyResult

from fltraining.clock import utcnow
from fltraining.jsonschema import inline_refs
from fltraining.options import DAISY_CHAIN_RULE_EXPR, TrainingOptions, daisy_chained_target
from fltraining.states import AggregationMethod, Phase, TrainingState, UncertaintyMethod


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


class Session(Document):
    """A sign-in of a user (the dashboard's): a token of its own that expires, stored only as a hash."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    user: UUID
    token_hash: str = Field(min_length=64, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime

    class Settings:
        name = "sessions"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("token_hash", unique=True, name="token_hash_unique"),
            IndexModel("user", name="user"),
            IndexModel("expires_at", expireAfterSeconds=0, name="expires_at_ttl"),
        ]


class TensorDocument(BaseModel):
    """One tensor of a model's signature."""

    name: str
    shape: list[int]
    dtype: str


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
    # On a new clone: the training it was made for, until the sweeper sees that training (or, after a crash
    # between the two inserts, removes the clone) or the training is deleted first.
    pending_training: UUID | None = None
    # The accepted weight format ("safetensors", "npz", "torch", "onnx"), or None with the reason in format_problem.
    format: str | None = None
    format_problem: str | None = Field(default=None, max_length=1000)
    # Tensor signature as {"name", "shape", "dtype"} documents (names hold dots, so they cannot be keys).
    tensors: list[TensorDocument] = Field(default_factory=list)
    swag_first_file_id: UUID | None = None
    swag_second_file_id: UUID | None = None
    # A server optimizer's state (float64 safetensors blobs) and its step count, replaced with the weights.
    optimizer_m_file_id: UUID | None = None
    optimizer_v_file_id: UUID | None = None
    optimizer_steps: int = Field(default=0, ge=0)
    # The ONNX graph inference runs: the model file itself for format "onnx", else an attached graph file.
    graph_file_id: UUID | None = None
    graph_digest: str | None = Field(default=None, min_length=64, max_length=64)
    # An ensemble model (DLR's "mean model"): inference runs one pass per member.
    ensemble_members: list[UUID] | None = None
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "models"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("owner", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)], name="owner_created"),
            IndexModel("file_id", name="file_id"),
            IndexModel("pending_training", name="pending_training", sparse=True),
        ]


class ChainLink(BaseModel):
    """FedDC: a round participant and the local model it was handed."""

    user: UUID
    model: UUID


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
    # The round engine's fields: see fltraining/engine/ and api-rounds.md.
    round: int = Field(default=0, ge=0)
    phase: Phase | None = None
    round_participants: list[UUID] = Field(default_factory=list)
    round_arrived: list[UUID] = Field(default_factory=list)
    round_deadline: datetime | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    # FedDC: which local model each round participant trains in this sub-round.
    chain: list[ChainLink] = Field(default_factory=list)
    # Side effects of the last steps (events, notifications, file moves), written in the same update
    # as the step and applied idempotently afterwards by any process.
    effects: list[dict[str, Any]] = Field(default_factory=list)
    # True from a step that adds effects until the reconciler finds none left: the indexed way to find
    # trainings with pending effects (`effects.0 $exists` reads every training, 66 ms per 1,000 on the
    # embedded store, every reconcile interval, in every process).
    effects_pending: bool = False

    # Checked by the database besides the generated `$jsonSchema` (see `collection_validator`).
    stored_rule: ClassVar[dict[str, Any]] = DAISY_CHAIN_RULE_EXPR

    class Settings:
        name = "trainings"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel("model", unique=True, name="model_unique"),
            # The lists' filter and every ordering they offer, `_id` last as the lists' tie-break, so MongoDB
            # serves each sorted page from an index (both directions; the participant list's `$or` merges two).
            *(
                IndexModel([(who, pymongo.ASCENDING), (field, pymongo.DESCENDING), ("_id", pymongo.DESCENDING)],
                           name=f"{who}_{field}_id")
                for who in ("actor", "participants")
                for field in ("last_update", "created_at")
            ),
            IndexModel([("state", pymongo.ASCENDING), ("aggregation_method", pymongo.ASCENDING)], name="state_aggregation"),
            IndexModel("uncertainty_method", name="uncertainty_method"),
            IndexModel("effects.file_ids", name="effects_file_ids", sparse=True),
            IndexModel("effects_pending", name="effects_pending"),
            IndexModel("participants", name="participants"),
            IndexModel("round_participants", name="round_participants"),
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


class Update(Document):
    """A participant's local model for one round (a "LocalModel" in DLR); bytes in GridFS."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    training: UUID
    model: UUID  # the global model it updates
    round: int = Field(ge=0)
    user: UUID
    sample_size: int = Field(ge=1)
    file_id: UUID
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "updates"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel(
                [("training", pymongo.ASCENDING), ("round", pymongo.ASCENDING), ("user", pymongo.ASCENDING)],
                unique=True, name="one_update_per_round",
            ),
            IndexModel("file_id", name="file_id"),
        ]


class SwagStatistic(Document):
    """A participant's SWAG first and second moments for one round."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    training: UUID
    model: UUID
    round: int = Field(ge=0)
    user: UUID
    sample_size: int = Field(ge=1)
    first_file_id: UUID
    second_file_id: UUID
    sha256: str = Field(min_length=64, max_length=64)  # of both files' digests, for retries
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "swag_statistics"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel(
                [("training", pymongo.ASCENDING), ("round", pymongo.ASCENDING), ("user", pymongo.ASCENDING)],
                unique=True, name="one_statistic_per_round",
            ),
            IndexModel("first_file_id", name="first_file_id"),
            IndexModel("second_file_id", name="second_file_id"),
        ]


class Metric(Document):
    """One reported metric value of a model (global or local) at a step (the round)."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    model: UUID
    training: UUID | None = None
    step: int = Field(ge=0)
    reporter: UUID | None  # None: measured by the service itself (server-side evaluation)
    key: str = Field(min_length=1, max_length=64)
    value: float
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "metrics"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel(
                [("model", pymongo.ASCENDING), ("step", pymongo.ASCENDING), ("reporter", pymongo.ASCENDING),
                 ("key", pymongo.ASCENDING)],
                unique=True, name="one_value_per_key",
            ),
            IndexModel([("training", pymongo.ASCENDING), ("step", pymongo.ASCENDING)], name="training_step"),
        ]


class Event(Document):
    """One entry of a training's audit trail; ids sort in the order the events happened."""

    id: str = Field(max_length=64)  # type: ignore[assignment]  # "<ms since epoch>-<index>-<random>"
    training: UUID
    type: str = Field(max_length=64)
    round: int = Field(ge=0)
    at: datetime
    user: UUID | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    class Settings:
        name = "events"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("training", pymongo.ASCENDING), ("_id", pymongo.ASCENDING)], name="training_order"),
            IndexModel([("type", pymongo.ASCENDING), ("at", pymongo.ASCENDING)], name="type_at"),
        ]


class Receipt(BaseModel):
    """What became of one receiver of a notification, other than a delivery at the first try."""

    user: UUID
    status: str = Field(max_length=16)  # retrying, rejected, failed, dropped
    attempts: int = Field(default=0, ge=0)
    next_attempt_at: datetime | None = None
    last_error: str | None = Field(default=None, max_length=500)
    at: datetime


class Addressed(BaseModel):
    """Body fields one receiver gets instead of the common ones (FedDC: the local model to train)."""

    user: UUID
    body: dict[str, Any]


class Notification(Document):
    """An outbox record: one notification to a set of receivers (a fan-out), delivered at least once by any process.

    Written in the same step as the state change that causes it (through the training's effects); on the
    happy path it is claimed, delivered to every receiver from memory and settled: no store operation per
    receiver. Retries, rejections and failures are recorded per receiver in `receipts`.
    """

    id: str = Field(max_length=128)  # type: ignore[assignment]  # the effect's id (sorts by time)
    training: UUID
    notification_type: str = Field(max_length=64)
    body: dict[str, Any]
    addressed: list[Addressed] = Field(default_factory=list)
    # Round notifications carry the DLR rules: 4xx removes the participant, exhaustion fails the training.
    round_notification: bool
    receivers: list[UUID]
    pending: list[UUID]  # receivers not settled yet
    receipts: list[Receipt] = Field(default_factory=list)
    delivered: int = Field(default=0, ge=0)
    status: str = Field(max_length=16)  # pending, settled
    next_attempt_at: datetime  # when a process may (re)claim it
    claimed_by: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
    settled_at: datetime | None = None
    # Set when settled: settled_at + FLTRAINING_NOTIFICATION_RETENTION_DAYS (a TTL index on MongoDB, the sweeper
    # on the embedded store); a pending record has none, so it is never purged.
    expires_at: datetime | None = None

    class Settings:
        name = "notifications"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("status", pymongo.ASCENDING), ("next_attempt_at", pymongo.ASCENDING)], name="due"),
            IndexModel([("training", pymongo.ASCENDING), ("_id", pymongo.ASCENDING)], name="training_order"),
            IndexModel("expires_at", expireAfterSeconds=0, name="expires_at_ttl"),
        ]


class SetAsideEffect(Document):
    """A training's effect that could never be applied (the store refused it), kept for inspection."""

    id: str = Field(max_length=64)  # type: ignore[assignment]  # the effect's own id
    training: UUID
    effect: dict[str, Any]
    error: str = Field(max_length=1000)
    at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "set_aside_effects"
        indexes: ClassVar[list[IndexModel]] = [IndexModel("training", name="training")]


class Dataset(Document):
    """A held-out data set an actor uploaded for server-side evaluation (an `.npz` of `x` and `y`)."""

    id: UUID = Field(default_factory=uuid4)  # type: ignore[assignment]
    owner: UUID
    name: str = Field(min_length=1, max_length=256)
    file_id: UUID
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    samples: int = Field(ge=1)
    x_shape: list[int]
    x_dtype: str = Field(max_length=16)
    y_shape: list[int]
    y_dtype: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "datasets"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("owner", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)], name="owner_created"),
            IndexModel("file_id", name="file_id"),
        ]


DOCUMENT_MODELS: list[type[Document]] = [
    User, Session, Model, Training, LoginFailures, MetricsSnapshot, Update, SwagStatistic, Metric, Event, Notification,
    SetAsideEffect, Dataset,
]

# Every (collection, field) that may hold a GridFS file id: a file none of them names is a leftover.
FILE_REFERENCES: list[tuple[type[Document], str]] = [
    (Model, "file_id"),
    (Model, "swag_first_file_id"),
    (Model, "swag_second_file_id"),
    (Model, "graph_file_id"),
    (Model, "optimizer_m_file_id"),
    (Model, "optimizer_v_file_id"),
    (Update, "file_id"),
    (SwagStatistic, "first_file_id"),
    (SwagStatistic, "second_file_id"),
    (Training, "effects.file_ids"),
    (Dataset, "file_id"),
]
