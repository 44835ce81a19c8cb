"""Service configuration, read from `FLTRAINING_*` environment variables."""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Every setting of the service; each field is `FLTRAINING_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="FLTRAINING_", extra="ignore")

    mongodb_url: str | None = Field(
        default=None,
        description="MongoDB URL; unset means the embedded store is started.",
    )
    database: str = Field(
        default="fltraining",
        description="Database name when the URL names none.",
    )
    data_dir: Path = Field(
        default=Path("./fltraining-data"),
        description="Where the embedded store keeps its SQLite file, the `files` blob store its blobs "
        "(`blobs/`), and uploads are staged.",
    )
    blob_store: Literal["files", "gridfs"] | None = Field(
        default=None,
        description="Where model bytes live: `files` (under the data directory; the default with the "
        "embedded store) or `gridfs` (in the database; the default with a MongoDB URL).",
    )
    embedded_host: str = Field(default="127.0.0.1", description="Embedded store address.")
    embedded_port: int = Field(
        default=27018, ge=0, le=65535, description="Embedded store port (0 = any free port)."
    )
    host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP listen port.")
    registration_open: bool = Field(
        default=True, description="Whether POST /api/users/ accepts new users."
    )
    max_json_bytes: int = Field(default=1 * MIB, ge=1024, description="Largest JSON body.")
    max_model_bytes: int = Field(
        default=512 * MIB, ge=1, description="Largest uploaded model file."
    )
    max_options_depth: int = Field(
        default=8, ge=1, le=64, description="Deepest nesting allowed in training options."
    )
    password_hash_time_cost: int = Field(
        default=2, ge=1, le=10, description="Argon2 time cost for password hashes."
    )
    auth_cache_seconds: float = Field(
        default=2.0, ge=0, le=300,
        description="How long a process trusts verified credentials without asking the database (0 = never).",
    )
    token_lifetime_days: float = Field(
        default=0, ge=0, description="Days a new user's token stays valid (0 = no expiry, as DLR)."
    )
    session_hours: float = Field(
        default=12, gt=0, le=24 * 30,
        description="Hours a sign-in token (POST /api/sessions/, the dashboard's) stays valid; expired ones are "
        "removed by a TTL index.",
    )
    login_failure_limit: int = Field(
        default=20, ge=0,
        description="Failed passwords per account and window before that account's password logins get 429 "
        "(0 = no limit); tokens are never refused.",
    )
    login_address_failure_limit: int = Field(
        default=1000, ge=0,
        description="Failed logins per address and window before 429 (0 = no limit): a ceiling against "
        "guessing across many accounts, far above what one proxy's users cause.",
    )
    login_failure_window_seconds: int = Field(
        default=60, ge=1, le=86_400, description="Length of the failed-login window."
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600,
        description="Longest wait for a whole JSON body, or for the next bytes of a model upload (408).",
    )
    upload_timeout_seconds: float = Field(
        default=3600.0, gt=0,
        description="Longest a model upload may keep the service waiting for its bytes, in all (408).",
    )
    keepalive_timeout_seconds: float = Field(
        default=75.0, gt=0, le=3600,
        description="Longest a connection may stay without a complete request (idle, or slow headers).",
    )
    sweep_interval_seconds: float = Field(
        default=60, gt=0, description="How often each process looks for leftovers of crashed writes."
    )
    orphan_grace_seconds: float = Field(
        default=300, ge=0, description="Age after which a pending clone or an unreferenced file is a leftover."
    )
    notification_allow_loopback: bool = Field(
        default=False,
        description="Allow message endpoints on loopback / link-local addresses (tests, single-machine demos).",
    )
    notification_max_attempts: int = Field(
        default=5, ge=1, le=100, description="Delivery attempts before the rule for exhausted retries applies."
    )
    notification_backoff_seconds: float = Field(
        default=2.0, gt=0, le=3600, description="Wait before the second attempt; doubles with each attempt (max 300 s)."
    )
    notification_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="Longest wait for a message endpoint's answer."
    )
    notification_retention_days: float = Field(
        default=7, gt=0, le=3650,
        description="Days a settled notification record is kept (then removed: a TTL index on MongoDB, the "
        "sweeper on the embedded store); unsettled records are never removed.",
    )
    lock_lease_seconds: float = Field(
        default=300, gt=0, description="How long an aggregation claim holds before another process may redo it."
    )
    reconcile_interval_seconds: float = Field(
        default=5, gt=0,
        description="How often each process looks for expired leases, due notifications and round timeouts.",
    )
    store_command_counts_file: Path | None = Field(
        default=None,
        description="Benchmarks only: count the store commands this process sends and write them to "
        "`<file>.<pid>.json` on SIGUSR1 (bench/scale_bench.py reads them).",
    )
    fault_hold_after_claim: bool = Field(
        default=False,
        description="Fault tests only: claim aggregations and never finish them, like a hung process.",
    )
    fault_hold_before_commit: int | None = Field(
        default=None, ge=0,
        description="Fault tests only: compute this round's aggregation (its files written), then never commit "
        "it, like a process that hangs just before its commit.",
    )
    inference_threads: int = Field(
        default=2, ge=1, le=256, description="Threads running inference passes (off the event loop)."
    )
    inference_queue: int = Field(
        default=8, ge=0, le=10_000,
        description="Inference requests that may wait for a thread; beyond that 503 with Retry-After.",
    )
    inference_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600,
        description="Longest an inference request may run (its passes are stopped, 503 with Retry-After).",
    )
    inference_max_elements: int = Field(
        default=1_000_000, ge=1, le=1_000_000_000,
        description="Most numbers a `model_input` may hold (400 above); also bounds one batched run.",
    )
    inference_max_body_bytes: int = Field(
        default=32 * MIB, ge=1024,
        description="Largest inference request body (JSON or multipart; 413 above): room for the most numbers "
        "as JSON text, and a bound on the memory parsing it takes.",
    )
    inference_sessions: int = Field(
        default=8, ge=1, le=1024, description="onnxruntime sessions kept ready per process (per model and round)."
    )
    inference_session_threads: int = Field(
        default=1, ge=0, le=256,
        description="onnxruntime's threads per pass (0 = one per core); requests run in parallel on the pool.",
    )
    max_dataset_bytes: int = Field(
        default=256 * MIB, ge=1, description="Largest held-out data set file (POST /api/datasets/)."
    )
    dp_allow_seed: bool = Field(
        default=False,
        description="Tests only: accept `options.differential_privacy.seed`, which makes the privacy noise "
        "reproducible (and so no protection at all).",
    )
    docs_dir: Path = Field(
        default=Path("site"),
        description="The built docs site (`make docs` writes it to `site/`), served at /docs/ when it is there "
        "at start-up.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Least severe log records written (any case: `info` is `INFO`)."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Log lines on stderr: `text` (readable), `json` (one JSON object per line), or `auto`: "
        "text when stderr is a terminal, JSON otherwise.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        """Log levels are read in any case."""
        return value.upper() if isinstance(value, str) else value
