"""Building the services for one database from the settings."""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from fltraining.engine.outbox import NotificationDelivery
from fltraining.engine.rounds import RoundEngine
from fltraining.engine.uploads import ContributionService
from fltraining.inference.pool import InferencePool, SessionCache
from fltraining.inference.service import InferenceService
from fltraining.security import PasswordHashing
from fltraining.services.credential_cache import CredentialCache
from fltraining.services.datasets import DatasetService
from fltraining.services.graphs import GraphService
from fltraining.services.login_throttle import LoginThrottle
from fltraining.services.models import ModelService
from fltraining.services.trainings import TrainingService
from fltraining.services.users import UserService
from fltraining.settings import Settings
from fltraining.storage.blob_files import FileBlobStore
from fltraining.storage.blob_gridfs import GridFSBlobStore
from fltraining.storage.blobs import STAGING_DIR, BlobStore, Staging


@dataclass(frozen=True)
class Services:
    """Every domain service, wired together."""

    users: UserService
    models: ModelService
    trainings: TrainingService
    engine: RoundEngine
    contributions: ContributionService
    delivery: NotificationDelivery
    graphs: GraphService
    datasets: DatasetService
    inference: InferenceService
    inference_pool: InferencePool


BLOBS_DIR = "blobs"


def build_blob_store(database: AsyncDatabase[dict[str, Any]], settings: Settings) -> BlobStore:
    """The configured blob store (`gridfs` unless chosen otherwise: the embedded store's start-up chooses `files`)."""
    if settings.blob_store == "files":
        return FileBlobStore(settings.data_dir / BLOBS_DIR)
    return GridFSBlobStore(database, Staging(settings.data_dir / STAGING_DIR))


def build_services(database: AsyncDatabase[dict[str, Any]], settings: Settings) -> Services:
    """Wire the services of one process to one database."""
    models = ModelService(build_blob_store(database, settings), settings.max_model_bytes)
    lifetime = timedelta(days=settings.token_lifetime_days) if settings.token_lifetime_days else None
    users = UserService(
        PasswordHashing(settings.password_hash_time_cost),
        models,
        CredentialCache(settings.auth_cache_seconds),
        LoginThrottle(settings.login_failure_limit, settings.login_address_failure_limit,
                      settings.login_failure_window_seconds),
        lifetime,
        settings.notification_allow_loopback,
        timedelta(hours=settings.session_hours),
    )
    trainings = TrainingService(users, models, settings.max_options_depth, settings.dp_allow_seed)
    engine = RoundEngine(models, settings.lock_lease_seconds, settings.fault_hold_after_claim,
                         settings.fault_hold_before_commit)
    delivery = NotificationDelivery(
        engine,
        settings.notification_allow_loopback,
        settings.notification_max_attempts,
        settings.notification_backoff_seconds,
        settings.notification_timeout_seconds,
        settings.notification_retention_days,
    )
    engine.outbox = delivery
    trainings.on_change(engine.kick)
    pool = InferencePool(settings.inference_threads, settings.inference_queue, settings.inference_timeout_seconds)
    inference = InferenceService(models, pool, SessionCache(settings.inference_sessions),
                                 settings.inference_max_elements, settings.inference_session_threads)
    engine.evaluate = inference.evaluate
    return Services(users, models, trainings, engine, ContributionService(models, engine, models.facts), delivery,
                    GraphService(models), DatasetService(models, settings.max_dataset_bytes), inference, pool)
