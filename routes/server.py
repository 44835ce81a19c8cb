"""Running the service: one process, or a supervisor with N worker processes on one port."""

import errno
import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.context import SpawnProcess
from types import FrameType

from aiohttp import web

from fltraining.heap import freeze_startup_objects
from fltraining.logs import configure_logging
from fltraining.settings import Settings
from fltraining.storage.embedded import EmbeddedStore, EmbeddedStoreError, port_free, start_for
from routes.app import create_app

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 3.0


def redact_url(url: str) -> str:
    """A MongoDB URL with any password replaced, safe to log."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def writable_data_dir(settings: Settings) -> str | None:
    """Why the data directory (the embedded store's files, blobs, staged uploads) cannot be used, or None."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"FLTRAINING_DATA_DIR={settings.data_dir}: {error.strerror}"
    if not os.access(settings.data_dir, os.W_OK | os.X_OK):
        return f"FLTRAINING_DATA_DIR={settings.data_dir}: not writable by this user (uploads are staged there)"
    return None


def run_worker(settings: Settings, reuse_port: bool) -> None:
    """Serve HTTP in this process until SIGTERM or SIGINT; a start-up problem is one log line and exit 1."""
    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    if settings.mongodb_url:
        log.info("store: MongoDB at %s", redact_url(settings.mongodb_url))
    app = create_app(settings)

    async def listening(_: web.Application) -> None:
        freeze_startup_objects()
        log.info("fltraining listening on http://%s:%d", settings.host, settings.port)

    app.on_startup.append(listening)  # after the store and the database are up
    try:
        web.run_app(
            app, host=settings.host, port=settings.port, reuse_port=reuse_port,
            print=None, access_log=None, handle_signals=True,
            # aiohttp's keep-alive timer also runs from connect until a request's headers are complete,
            # so it bounds clients that send headers slowly as well as idle connections.
            keepalive_timeout=settings.keepalive_timeout_seconds,
            # In-flight requests get this long to finish at Ctrl-C or SIGTERM; event streams end at once.
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
    except EmbeddedStoreError as error:
        log.error("cannot start: %s", error)
        raise SystemExit(1) from None
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        log.error("cannot start: FLTRAINING_PORT=%d: the port is in use on %s", settings.port, settings.host)
        raise SystemExit(1) from None


def serve(settings: Settings, workers: int) -> None:
    """Run the service with `workers` processes sharing one port and one store."""
    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    if (problem := writable_data_dir(settings)) is not None:
        log.error("cannot start: %s", problem)
        raise SystemExit(1)
    if workers <= 1:
        run_worker(settings, reuse_port=False)
        return
    if settings.port == 0:
        raise SystemExit("--workers > 1 needs a fixed --port")
    if not port_free(settings.host, settings.port):
        raise SystemExit(f"port {settings.port} on {settings.host} is already in use")
    store: EmbeddedStore | None = None
    if settings.mongodb_url is None:
        try:
            store = start_for(settings.data_dir, settings.embedded_host, settings.embedded_port,
                              "embedded_port" in settings.model_fields_set)
        except EmbeddedStoreError as error:
            log.error("cannot start: %s", error)
            raise SystemExit(1) from None
        url = store.url
        log.info("store: embedded (mongoeco on SQLite), data in %s, reachable at %s", store.data_path, url)
        settings = settings.model_copy(update={"mongodb_url": url, "blob_store": settings.blob_store or "files"})
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start_worker() -> SpawnProcess:
        process = context.Process(target=run_worker, args=(settings, True), daemon=False)
        process.start()
        return process

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processes = [start_worker() for _ in range(workers)]
    log.info("supervisor: %d workers on http://%s:%d", workers, settings.host, settings.port)
    try:
        while not stopping:
            for index, process in enumerate(processes):
                process.join(timeout=0.2)
                if process.exitcode is not None and not stopping:
                    log.warning("worker %d exited with %s; starting a new one", process.pid, process.exitcode)
                    processes[index] = start_worker()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
        if store is not None:
            store.stop()


