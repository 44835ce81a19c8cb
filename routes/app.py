"""The application factory."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from fltraining.clock import utcnow
from fltraining.engine.outbox import purge_settled
from fltraining.services.factory import build_services
from fltraining.settings import Settings
from fltraining.storage.command_counts import CommandCounter
from fltraining.storage.database import database_name, init_database, make_client
from fltraining.storage.embedded import start_for
from routes import (
    dashboard,
    datasets,
    docs_site,
    inference,
    models,
    rounds,
    service,
    sessions,
    trainings,
    users,
)
from routes.auth import make_auth_middleware
from routes.background import periodic
from routes.errors import error_middleware
from routes.keys import (
    contributions_key,
    database_name_key,
    datasets_key,
    delivery_key,
    engine_key,
    graphs_key,
    inference_key,
    metrics_key,
    models_key,
    mongo_client_key,
    openapi_key,
    settings_key,
    shutting_down_key,
    trainings_key,
    users_key,
)
from routes.metrics import FLUSH_SECONDS as METRICS_FLUSH_SECONDS
from routes.metrics import RequestMetrics
from routes.observability import add_request_id, observability_middleware
from routes.openapi import build_openapi
from routes.table import Endpoint, add_endpoints, is_public

log = logging.getLogger(__name__)

# Fixed routes before parameterised ones: aiohttp matches in registration order.
ENDPOINTS: list[Endpoint] = [
    *service.ENDPOINTS, *sessions.ENDPOINTS, *users.ENDPOINTS, *inference.ENDPOINTS, *models.ENDPOINTS, *trainings.ENDPOINTS,
    *rounds.ENDPOINTS, *datasets.ENDPOINTS,
]


async def embedded_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the embedded store when no MongoDB URL is configured."""
    settings = app[settings_key]
    if settings.mongodb_url is not None:
        yield
        return
    # Started from the main thread on purpose: Linux ties the child's parent-death signal to
    # the thread that forked it, and a pool thread may exit while the service runs on.
    store = start_for(settings.data_dir, settings.embedded_host, settings.embedded_port,
                      "embedded_port" in settings.model_fields_set)
    url = store.url
    log.info("store: embedded (mongoeco on SQLite), data in %s, reachable at %s", store.data_path, url)
    # Model bytes stay out of the embedded store (it keeps documents as JSON text): files by default.
    app[settings_key] = settings.model_copy(update={"mongodb_url": url, "blob_store": settings.blob_store or "files"})
    try:
        yield
    finally:
        store.stop()


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Connect, install validators and indexes, and build the services."""
    settings = app[settings_key]
    assert settings.mongodb_url is not None
    counter = CommandCounter() if settings.store_command_counts_file is not None else None
    client = make_client(settings.mongodb_url, [counter] if counter is not None else None)
    if counter is not None and settings.store_command_counts_file is not None:
        stem = settings.store_command_counts_file
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, counter.dump, stem)
    name = database_name(settings.mongodb_url, settings.database)
    await init_database(client[name])
    services = build_services(client[name], settings)
    log.info("blob store: %s", services.models.files.kind)
    app[mongo_client_key] = client
    app[database_name_key] = name
    app[models_key] = services.models
    app[users_key] = services.users
    app[trainings_key] = services.trainings
    app[engine_key] = services.engine
    app[contributions_key] = services.contributions
    app[delivery_key] = services.delivery
    app[graphs_key] = services.graphs
    app[datasets_key] = services.datasets
    app[inference_key] = services.inference
    try:
        yield
    finally:
        services.inference_pool.close()
        await client.close()


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Deliver notifications in the background; on exit, stop engine work (leases expire for others)."""
    interval = app[settings_key].reconcile_interval_seconds
    delivery = asyncio.create_task(app[delivery_key].run(interval), name="notification-delivery")
    try:
        yield
    finally:
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        await app[engine_key].close()


async def reconcile(app: web.Application) -> None:
    """Redo expired aggregations, apply round timeouts and effects dead processes left pending."""
    await app[engine_key].reconcile()


async def sweep_leftovers(app: web.Application) -> None:
    """Settle what crashed writes left behind (every deletion is conditional, so processes agree)."""
    older_than = utcnow() - timedelta(seconds=app[settings_key].orphan_grace_seconds)
    if removed := await app[models_key].sweep(older_than):
        log.info("sweeper removed %d leftovers of interrupted writes", removed)
    if purged := await purge_settled(utcnow()):
        log.info("sweeper removed %d settled notification records past their retention", purged)


async def flush_metrics(app: web.Application) -> None:
    """Share this process's request metrics with the other processes through the database."""
    await app[metrics_key].flush()


async def _shutting_down(app: web.Application) -> None:
    """Tell long-lived handlers (event streams) to end, so shutdown waits only for ordinary requests."""
    app[shutting_down_key].set()


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application for these settings."""
    by_handler = {endpoint.handler: endpoint for endpoint in ENDPOINTS}
    auth = make_auth_middleware(lambda request: is_public(request, by_handler))
    app = web.Application(
        middlewares=[observability_middleware, error_middleware, auth], client_max_size=settings.max_json_bytes
    )
    app[settings_key] = settings
    app[metrics_key] = RequestMetrics()
    app[shutting_down_key] = asyncio.Event()
    app.on_shutdown.append(_shutting_down)
    app.on_response_prepare.append(add_request_id)
    app[openapi_key] = build_openapi(ENDPOINTS)
    app.cleanup_ctx.append(embedded_store_ctx)
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(periodic("metrics-flush", lambda _: METRICS_FLUSH_SECONDS, flush_metrics, run_at_exit=True))
    app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(periodic("reconciler", lambda a: a[settings_key].reconcile_interval_seconds, reconcile))
    app.cleanup_ctx.append(periodic("sweeper", lambda a: a[settings_key].sweep_interval_seconds, sweep_leftovers))
    add_endpoints(app, ENDPOINTS)
    service.add_docs_assets(app)
    docs_site.add_docs_site(app, settings.docs_dir)
    dashboard.add_dashboard(app)  # last: its catch-all answers every path no other route takes
    return app
