"""Delivering the notification outbox: at least once, by any process, with exponential backoff.

An entry is claimed by pushing its next attempt time forward with a conditional update, so two
processes never send it at the same moment; a process that dies mid-delivery leaves an entry
that becomes due again. The DLR rules apply to round notifications: a 4xx answer removes the
participant (and tells the actor), exhausted retries move the training to E.
"""

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import defaultdict
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pymongo.errors import DuplicateKeyError, PyMongoError

from fltraining.clock import utcnow
from fltraining.documents import Event, Notification, Training, User
from fltraining.engine.effects import effect_id
from fltraining.engine.rounds import RoundEngine
from fltraining.errors import InvalidInput
from fltraining.notifications.endpoints import refused_address, resolve_endpoint
from fltraining.states import TrainingState

log = logging.getLogger(__name__)

BATCH = 200
MAX_BACKOFF_SECONDS = 300.0
PARALLEL_RECEIVERS = 32


# The phase a round notification asks a client to act in.
PHASE_OF = {"UPDATE_ROUND_START": "updates", "MODEL_TEST_ROUND": "testing", "SWAG_ROUND_START": "swag"}


def _current(entry: Notification, training: dict[str, Any]) -> bool:
    """Whether a round notification still announces the training's current round and phase."""
    running = training["state"] in {TrainingState.ONGOING, TrainingState.SWAG_ROUND}
    return (running and entry.body.get("round") == training["round"]
            and training["phase"] == PHASE_OF.get(entry.notification_type))


class EndpointRefused(OSError):
    """A message endpoint resolved to an address the service must not call."""


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp, refusing forbidden addresses at connect time (no DNS rebinding past the guard)."""

    def __init__(self, allow_loopback: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_loopback = allow_loopback

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """Resolve, then refuse if any address is forbidden."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if reason := refused_address(ipaddress.ip_address(result["host"]), self._allow_loopback):
                raise EndpointRefused(f"{host} resolves to {reason}")
        return results

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()


class NotificationDelivery:
    """Sends due outbox entries; one instance per service process."""

    def __init__(self, engine: RoundEngine, allow_loopback: bool, max_attempts: int,
                 backoff_seconds: float, timeout_seconds: float) -> None:
        self._engine = engine
        self._allow_loopback = allow_loopback
        self._max_attempts = max_attempts
        self._backoff = backoff_seconds
        self._timeout = timeout_seconds
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        # Receivers with a delivery in flight: their next entries wait, so each receiver gets its
        # notifications in order, while a slow receiver holds up no one else.
        self._busy: dict[Any, asyncio.Task[None]] = {}

    def kick(self) -> None:
        """Deliver soon (new entries were written)."""
        self._wake.set()

    async def run(self, interval: float) -> None:
        """Deliver due entries whenever woken, and at least every `interval` seconds."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow_loopback), limit=PARALLEL_RECEIVERS)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            try:
                while True:
                    self._wake.clear()
                    try:
                        await self.deliver_due()
                    except PyMongoError as error:
                        log.warning("notification delivery: database unavailable (%s)", type(error).__name__)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), interval)
            finally:
                for task in self._busy.values():
                    task.cancel()
                await asyncio.gather(*self._busy.values(), return_exceptions=True)

    async def deliver_due(self) -> int:
        """Start delivering every due entry, in order per receiver (in the background). Returns entries started."""
        now = utcnow()
        due = [Notification.model_validate(raw) async for raw in Notification.get_pymongo_collection().find(
            {"status": "pending", "next_attempt_at": {"$lte": now}}).sort("_id", 1).limit(BATCH)]
        by_receiver: dict[Any, list[Notification]] = defaultdict(list)
        for entry in due:
            if entry.user not in self._busy:
                by_receiver[entry.user].append(entry)
        for receiver, entries in list(by_receiver.items()):
            # In order per receiver: while an older entry waits for its retry, newer ones wait too.
            older = await Notification.get_pymongo_collection().find_one(
                {"user": receiver, "status": "pending", "_id": {"$lt": entries[0].id}}, {"_id": 1}
            )
            if older is not None:
                del by_receiver[receiver]
        for receiver, entries in by_receiver.items():
            task = asyncio.create_task(self._deliver_in_order(entries), name="notify")
            self._busy[receiver] = task
            task.add_done_callback(lambda _, receiver=receiver: self._finished(receiver))
        return sum(len(entries) for entries in by_receiver.values())

    def _finished(self, receiver: Any) -> None:
        self._busy.pop(receiver, None)
        self._wake.set()  # that receiver's later entries may be due

    async def _deliver_in_order(self, entries: list[Notification]) -> None:
        for entry in entries:
            try:
                if not await self._deliver(entry):
                    return  # to be retried: the receiver's later entries wait for it
            except PyMongoError as error:
                log.warning("notification delivery: database unavailable (%s)", type(error).__name__)
                return
            except Exception:
                log.exception("notification delivery failed unexpectedly")
                return

    async def _finish(self, entry: Notification, status: str, error: str | None = None) -> None:
        await Notification.get_pymongo_collection().update_one(
            {"_id": entry.id, "status": "pending"},
            {"$set": {"status": status, "finished_at": utcnow(), "last_error": error}},
        )

    async def _deliver(self, entry: Notification) -> bool:
        """Try one entry; True when it is settled (delivered, rejected, dropped or failed for good)."""
        claimed = await Notification.get_pymongo_collection().find_one_and_update(
            {"_id": entry.id, "status": "pending", "next_attempt_at": entry.next_attempt_at},
            {"$set": {"next_attempt_at": utcnow() + timedelta(seconds=self._timeout * 2 + 5)}},
        )
        if claimed is None:
            return False  # another process is on it
        training = await Training.get_pymongo_collection().find_one(
            {"_id": entry.training}, {"state": 1, "round": 1, "phase": 1}
        )
        if training is None:
            await self._finish(entry, "dropped", "the training is gone")
            return True
        if entry.round_notification and not _current(entry, training):
            # A round that is over (cancelled, timed out, moved on) must not make a client work for it.
            await self._finish(entry, "dropped", "the round it announced is over")
            return True
        user = await User.get_pymongo_collection().find_one({"_id": entry.user}, {"message_endpoint": 1})
        endpoint = None if user is None else user.get("message_endpoint")
        if not endpoint:
            await self._finish(entry, "dropped", "the user has no message endpoint")
            return True
        payload = {"notification_type": entry.notification_type, "training_uuid": str(entry.training),
                   "body": entry.body}
        try:
            await resolve_endpoint(endpoint, self._allow_loopback)
            assert self._session is not None
            async with self._session.post(endpoint, json=payload, allow_redirects=False) as response:
                status = response.status
        except InvalidInput as error:
            await self._give_up(entry, error.detail)
            return True
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return await self._retry(entry, f"{type(error).__name__}: {error}"[:500])
        if 200 <= status < 300:
            await self._finish(entry, "delivered")
            return True
        if 400 <= status < 500:
            await self._finish(entry, "rejected", f"HTTP {status}")
            if entry.round_notification:
                await self._engine.remove_participant(entry.training, entry.user, {
                    "reason": "notification_rejected", "notification_type": entry.notification_type,
                    "status": status})
            return True
        return await self._retry(entry, f"HTTP {status}")

    async def _retry(self, entry: Notification, error: str) -> bool:
        """Count a failed attempt; True when that was the last one."""
        attempts = entry.attempts + 1
        if attempts >= self._max_attempts:
            await self._give_up(entry, error, attempts)
            return True
        delay = min(self._backoff * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        await Notification.get_pymongo_collection().update_one(
            {"_id": entry.id, "status": "pending"},
            {"$set": {"attempts": attempts, "last_error": error, "next_attempt_at": utcnow() + timedelta(seconds=delay)}},
        )
        return False

    async def _give_up(self, entry: Notification, error: str, attempts: int | None = None) -> None:
        await Notification.get_pymongo_collection().update_one(
            {"_id": entry.id, "status": "pending"},
            {"$set": {"status": "failed", "attempts": attempts or entry.attempts + 1, "last_error": error,
                      "finished_at": utcnow()}},
        )
        log.warning("notification %s to a participant failed for good: %s", entry.notification_type, error)
        now = utcnow()
        with contextlib.suppress(DuplicateKeyError):
            await Event.get_pymongo_collection().insert_one({
                "_id": effect_id(now, 0), "training": entry.training, "type": "notification_failed",
                "round": int(entry.body.get("round", 0)), "at": now, "user": entry.user,
                "data": {"notification_type": entry.notification_type, "error": error},
            })
        if entry.round_notification:
            await self._engine.fail_running(entry.training, {
                "reason": "notification_failed", "notification_type": entry.notification_type,
                "user": str(entry.user), "error": error})
