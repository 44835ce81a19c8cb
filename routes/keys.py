"""Typed application keys for state shared by the handlers."""

import asyncio
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient

from fltraining.documents import User
from fltraining.engine.outbox import NotificationDelivery
from fltraining.engine.rounds import RoundEngine
from fltraining.engine.uploads import ContributionService
from fltraining.inference.service import InferenceService
from fltraining.services.datasets import DatasetService
from fltraining.services.graphs import GraphService
from fltraining.services.models import ModelService
from fltraining.services.trainings import TrainingService
from fltraining.services.users import UserService
from fltraining.settings import Settings
from routes.metrics import RequestMetrics

settings_key = web.AppKey("settings", Settings)
mongo_client_key = web.AppKey("mongo_client", AsyncMongoClient[dict[str, Any]])
database_name_key = web.AppKey("database_name", str)
users_key = web.AppKey("users", UserService)
models_key = web.AppKey("models", ModelService)
trainings_key = web.AppKey("trainings", TrainingService)
engine_key = web.AppKey("engine", RoundEngine)
contributions_key = web.AppKey("contributions", ContributionService)
delivery_key = web.AppKey("delivery", NotificationDelivery)
graphs_key = web.AppKey("graphs", GraphService)
datasets_key = web.AppKey("datasets", DatasetService)
inference_key = web.AppKey("inference", InferenceService)
openapi_key = web.AppKey("openapi", dict[str, Any])
shutting_down_key = web.AppKey("shutting_down", asyncio.Event)
docs_site_key = web.AppKey("docs_site", bool)  # whether the built docs site is served at /docs/

metrics_key = web.AppKey("metrics", RequestMetrics)

user_key = web.RequestKey("user", User)
request_id_key = web.RequestKey("request_id", str)
