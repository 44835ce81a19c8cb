"""Periodic jobs that every service process runs while its app is up."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

EXIT_JOB_SECONDS = 1.0

Job = Callable[[web.Application], Awaitable[None]]
CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def periodic(name: str, interval: Callable[[web.Application], float], job: Job, run_at_exit: bool = False) -> CleanupContext:
    """A cleanup context running `job` now and every `interval` seconds, cancelled at shutdown."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                try:
                    await job(app)
                except PyMongoError as error:  # the store is away: try again next time
                    log.warning("%s: database unavailable (%s)", name, type(error).__name__)
                await asyncio.sleep(interval(app))

        task = asyncio.create_task(loop(), name=name)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if run_at_exit:
                # Bounded: at shutdown the store may be gone, and the server-selection wait is 30 s.
                with contextlib.suppress(PyMongoError, TimeoutError):
                    async with asyncio.timeout(EXIT_JOB_SECONDS):
                        await job(app)

    return context
