"""Delivering the notification outbox: fan-outs, at least once, by any process, in order per receiver.

A notification to a set of receivers is one record. The process that writes it (applying a step's
effects) writes it claimed by itself and delivers it from memory at once: on the happy path the
store sees the record's insert, one look at older unsettled records, the receivers' endpoints (one
query per 400), the training's state for a round notification, and the settling update — nothing per
receiver. A claim is a lease (`next_attempt_at`): a process that dies mid-fan-out leaves a record
that any process claims again once the lease ran out and delivers to every receiver not settled
(at least once). Receivers that fail are retried with exponential backoff; their attempts,
rejections and failures are recorded per receiver (`receipts`). The DLR rules apply to round
notifications: a 4xx answer removes the participant (and tells the actor), exhausted retries move
the training to E.

Order per receiver: a receiver never gets a notification while an older one to it is unsettled.
Within a process, deliveries to one receiver wait for the previous one (a chain of futures); an older
record held elsewhere (another process, or released for a retry) defers the receivers it still names.
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pymongo.errors import DuplicateKeyError, PyMongoError

from fltraining.clock import utcnow
from fltraining.documents import Event, Notification, Receipt, Training, User
from fltraining.engine.effects import effect_id
from fltraining.engine.rounds import RoundEngine
from fltraining.errors import InvalidInput
from fltraining.notifications.endpoints import refused_address, resolve_endpoint
from fltraining.states import TrainingState
from fltraining.storage.queries import in_chunks

log = logging.getLogger(__name__)

BATCH = 50  # records claimed per scan
MAX_BACKOFF_SECONDS = 300.0
PARALLEL_RECEIVERS = 64
MAX_KNOWN_ENDPOINTS = 100_000

# The phase a round notification asks a client to act in.
PHASE_OF = {"UPDATE_ROUND_START": "updates", "MODEL_TEST_ROUND": "testing", "SWAG_ROUND_START": "swag"}


def _current(record: Notification, training: dict[str, Any]) -> bool:
    """Whether a round notification still announces the training's current round and phase."""
    running = training["state"] in {TrainingState.ONGOING, TrainingState.SWAG_ROUND}
    return (running and record.body.get("round") == training["round"]
            and training["phase"] == PHASE_OF.get(record.notification_type))


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


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt to one receiver came to."""

    user: UUID
    status: str  # delivered, retrying, deferred, rejected, failed, dropped
    error: str | None = None
    http_status: int | None = None

    @property
    def settled(self) -> bool:
        """Nothing more will be sent to this receiver for this record."""
        return self.status not in {"retrying", "deferred"}


class NotificationDelivery:
    """Delivers outbox records; one instance per service process."""

    def __init__(self, engine: RoundEngine, allow_loopback: bool, max_attempts: int,
                 backoff_seconds: float, timeout_seconds: float, retention_days: float = 7.0) -> None:
        self._engine = engine
        self._allow_loopback = allow_loopback
        self._max_attempts = max_attempts
        self._backoff = backoff_seconds
        self._timeout = timeout_seconds
        self._retention = timedelta(days=retention_days)
        # Long enough for one attempt at every receiver's answer; renewed while a long fan-out goes on.
        self._claim_for = timedelta(seconds=timeout_seconds * 2 + 5)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._waiting: list[Notification] = []  # taken before the session was up
        self._held: dict[str, asyncio.Task[None]] = {}  # records this process is delivering
        self._attempting: dict[str, set[UUID]] = {}  # the receivers each held record is being delivered to
        # Per receiver, the outcome of its latest delivery started here (record id, True when settled): the
        # next one waits for it, so each receiver gets its notifications in order.
        self._tails: dict[UUID, tuple[str, asyncio.Future[bool]]] = {}
        self._parallel = asyncio.Semaphore(PARALLEL_RECEIVERS)
        self._known_endpoints: dict[UUID, str] = {}

    # -- handing records over ---------------------------------------------------------------------

    def claim(self, record: dict[str, Any]) -> dict[str, Any]:
        """A new record, written as this process's to deliver (others may take it once the claim ran out)."""
        return {**record, "claimed_by": self._owner, "next_attempt_at": utcnow() + self._claim_for}

    def take(self, record: dict[str, Any]) -> None:
        """Deliver a record this process just wrote, from memory."""
        entry = Notification.model_validate(record)
        if self._session is None:
            self._waiting.append(entry)
            self._wake.set()
            return
        self._start(entry, fresh=True)

    def kick(self) -> None:
        """Look for due records soon."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, interval: float) -> None:
        """Deliver whatever is taken at once, and look for due records every `interval` seconds."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow_loopback), limit=PARALLEL_RECEIVERS)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            try:
                while True:
                    self._wake.clear()
                    waiting, self._waiting = self._waiting, []
                    for entry in waiting:
                        self._start(entry)
                    try:
                        await self.deliver_due()
                    except PyMongoError as error:
                        log.warning("notification delivery: database unavailable (%s)", type(error).__name__)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), interval)
            finally:
                self._session = None
                tasks = list(self._held.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def deliver_due(self) -> int:
        """Claim due records (unclaimed, released for a retry, or left by a dead process) and deliver them."""
        collection = Notification.get_pymongo_collection()
        now = utcnow()
        due = await collection.find({"status": "pending", "next_attempt_at": {"$lte": now}}).sort(
            "_id", 1).limit(BATCH).to_list()
        started = 0
        for raw in due:
            if raw["_id"] in self._held:
                continue
            claimed = await collection.update_one(
                {"_id": raw["_id"], "status": "pending", "next_attempt_at": raw["next_attempt_at"]},
                {"$set": {"claimed_by": self._owner, "next_attempt_at": now + self._claim_for}})
            if claimed.modified_count:
                self._start(Notification.model_validate({**raw, "claimed_by": self._owner}))
                started += 1
        return started

    def _start(self, record: Notification, fresh: bool = False) -> None:
        """Deliver a record in the background (`fresh`: written by this process just now, by the step that made
        its round current, so that is not read again)."""
        if record.id in self._held:
            return
        now = utcnow()
        due = [user for user in record.pending if self._due(record, user, now)]
        # Chained now, before any await: records start in the order they were written or found.
        chained = {user: self._chain(user, record.id) for user in due}
        task = asyncio.create_task(self._deliver_record(record, due, chained, fresh), name="notify")
        self._held[record.id] = task
        self._attempting[record.id] = set(due)
        task.add_done_callback(lambda _, record_id=record.id: self._release(record_id))

    def _release(self, record_id: str) -> None:
        self._held.pop(record_id, None)
        self._attempting.pop(record_id, None)

    def _chain(self, user: UUID, record_id: str) -> tuple[asyncio.Future[bool] | None, asyncio.Future[bool]]:
        """(the receiver's previous delivery here, or None; this delivery's outcome)."""
        previous = self._tails.get(user)
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._tails[user] = (record_id, mine)

        def forget(_: asyncio.Future[bool]) -> None:
            if self._tails.get(user, (None,))[0] == record_id:
                del self._tails[user]

        mine.add_done_callback(forget)
        return (None if previous is None else previous[1]), mine

    @staticmethod
    def _due(record: Notification, user: UUID, now: datetime) -> bool:
        receipt = next((r for r in record.receipts if r.user == user), None)
        return receipt is None or receipt.next_attempt_at is None or receipt.next_attempt_at <= now

    # -- one record -----------------------------------------------------------------------------------

    async def _deliver_record(
        self, record: Notification, due: list[UUID],
        chained: dict[UUID, tuple[asyncio.Future[bool] | None, asyncio.Future[bool]]], fresh: bool,
    ) -> None:
        outcomes: list[Outcome] = []
        keeper = asyncio.create_task(self._keep_claim(record.id), name="notify-claim")
        try:
            outcomes = await self._attempt(record, due, chained, fresh)
            await self._record(record, outcomes)
        except PyMongoError as error:
            log.warning("notification delivery: database unavailable (%s)", type(error).__name__)
        except Exception:
            log.exception("notification delivery failed unexpectedly")
        finally:
            keeper.cancel()
            settled = {outcome.user for outcome in outcomes if outcome.settled}
            for user, (_, mine) in chained.items():
                if not mine.done():
                    mine.set_result(user in settled)
            if len(settled) < len(due):  # a retry or a deferred receiver may be due before the next interval
                self._wake.set()

    async def _keep_claim(self, record_id: str) -> None:
        """Extend the claim while a long fan-out is still being delivered."""
        while True:
            await asyncio.sleep(self._claim_for.total_seconds() / 3)
            with contextlib.suppress(PyMongoError):
                await Notification.get_pymongo_collection().update_one(
                    {"_id": record_id, "status": "pending", "claimed_by": self._owner},
                    {"$set": {"next_attempt_at": utcnow() + self._claim_for}})

    async def _attempt(
        self, record: Notification, due: list[UUID],
        chained: dict[UUID, tuple[asyncio.Future[bool] | None, asyncio.Future[bool]]], fresh: bool,
    ) -> list[Outcome]:
        """Deliver to every due receiver (in parallel, each after its previous notification)."""
        if record.round_notification and not fresh:
            training = await Training.get_pymongo_collection().find_one(
                {"_id": record.training}, {"state": 1, "round": 1, "phase": 1})
            if training is None:
                return [Outcome(user, "dropped", "the training is gone") for user in record.pending]
            if not _current(record, training):
                # A round that is over (cancelled, timed out, moved on) must not make a client work for it.
                return [Outcome(user, "dropped", "the round it announced is over") for user in record.pending]
        held_elsewhere = await self._blocked_by_older(record)
        endpoints = await self._endpoints(due)
        overrides = {entry.user: entry.body for entry in record.addressed}

        async def one(user: UUID) -> Outcome:
            previous, mine = chained[user]
            earlier_unsettled = previous is not None and not await asyncio.shield(previous)
            if earlier_unsettled or user in held_elsewhere:
                outcome = Outcome(user, "deferred", "an earlier notification to this receiver is not settled")
            else:
                body = {**record.body, **overrides.get(user, {})}
                async with self._parallel:
                    outcome = await self._post(record, user, endpoints.get(user), body)
            mine.set_result(outcome.settled)
            return outcome

        return list(await asyncio.gather(*(one(user) for user in due)))

    async def _blocked_by_older(self, record: Notification) -> set[UUID]:
        """Receivers an older unsettled record still has to reach, other than by a delivery under way here
        (those are chained)."""
        blocked: set[UUID] = set()
        async for raw in Notification.get_pymongo_collection().find(
                {"status": "pending", "_id": {"$lt": record.id}}, {"pending": 1}):
            blocked.update(set(raw["pending"]) - self._attempting.get(raw["_id"], set()))
        return blocked

    async def _endpoints(self, users: list[UUID]) -> dict[UUID, str]:
        """The receivers' message endpoints: remembered per process (an endpoint is set at registration and the API
        never changes it), the others read in pieces — no store operation per receiver."""
        found = {user: endpoint for user in users if (endpoint := self._known_endpoints.get(user)) is not None}
        for chunk in in_chunks([user for user in users if user not in found]):
            async for raw in User.get_pymongo_collection().find({"_id": {"$in": chunk}}, {"message_endpoint": 1}):
                if raw.get("message_endpoint"):
                    found[raw["_id"]] = self._known_endpoints[raw["_id"]] = raw["message_endpoint"]
        if len(self._known_endpoints) > MAX_KNOWN_ENDPOINTS:
            self._known_endpoints.clear()
        return found

    async def _post(self, record: Notification, user: UUID, endpoint: str | None, body: dict[str, Any]) -> Outcome:
        if not endpoint:
            return Outcome(user, "dropped", "the user has no message endpoint")
        payload = {"notification_type": record.notification_type, "training_uuid": str(record.training), "body": body}
        try:
            await resolve_endpoint(endpoint, self._allow_loopback)
            assert self._session is not None
            async with self._session.post(endpoint, json=payload, allow_redirects=False) as response:
                status = response.status
        except InvalidInput as error:
            return Outcome(user, "failed", error.detail)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return Outcome(user, "retrying", f"{type(error).__name__}: {error}"[:500])
        if 200 <= status < 300:
            return Outcome(user, "delivered")
        if 400 <= status < 500:
            return Outcome(user, "rejected", f"HTTP {status}", status)
        return Outcome(user, "retrying", f"HTTP {status}")

    # -- recording what happened -----------------------------------------------------------------------

    async def _record(self, record: Notification, outcomes: list[Outcome]) -> None:
        """Apply the DLR rules, then write the receivers' outcomes and settle or release the record."""
        now = utcnow()
        receipts = {receipt.user: receipt for receipt in record.receipts}
        for outcome in outcomes:
            previous = receipts.get(outcome.user)
            attempts = (previous.attempts if previous else 0) + (0 if outcome.status in {"deferred", "dropped"} else 1)
            status = outcome.status
            if status == "retrying" and attempts >= self._max_attempts:
                status = "failed"
            if status == "delivered":
                if previous is not None:  # delivered after earlier attempts: its receipt keeps the history
                    receipts[outcome.user] = previous.model_copy(update={
                        "status": "delivered", "attempts": attempts, "next_attempt_at": None, "at": now})
                continue
            delay = self._backoff if status == "deferred" else min(
                self._backoff * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)
            receipts[outcome.user] = Receipt(
                user=outcome.user, status=status, attempts=attempts, last_error=outcome.error, at=now,
                next_attempt_at=now + timedelta(seconds=delay) if status in {"retrying", "deferred"} else None)
        # The rules first: a crash after them re-delivers (at least once), and both are idempotent.
        for outcome in outcomes:
            status = receipts[outcome.user].status if outcome.user in receipts else "delivered"
            if status == "rejected" and record.round_notification:
                await self._engine.remove_participant(record.training, outcome.user, {
                    "reason": "notification_rejected", "notification_type": record.notification_type,
                    "status": outcome.http_status})
            elif status == "failed":
                await self._failed(record, receipts[outcome.user])
        settled_now = {outcome.user for outcome in outcomes
                       if outcome.user not in receipts or receipts[outcome.user].status not in {"retrying", "deferred"}}
        remaining = [user for user in record.pending if user not in settled_now]
        delivered = sum(1 for outcome in outcomes if outcome.status == "delivered")
        fields: dict[str, Any] = {
            "pending": remaining, "receipts": [r.model_dump() for r in receipts.values()], "claimed_by": None,
        }
        if remaining:
            fields["next_attempt_at"] = min(
                (receipts[user].next_attempt_at or now) if user in receipts else now for user in remaining)
        else:
            fields.update(status="settled", settled_at=now, expires_at=now + self._retention)
        await Notification.get_pymongo_collection().update_one(
            {"_id": record.id, "status": "pending", "claimed_by": self._owner},
            {"$set": fields, "$inc": {"delivered": delivered}})

    async def _failed(self, record: Notification, receipt: Receipt) -> None:
        """Retries are exhausted (or the endpoint is refused): an event, and for a round notification, state E."""
        error = receipt.last_error or "delivery failed"
        log.warning("notification %s to a participant failed for good: %s", record.notification_type, error)
        now = utcnow()
        with contextlib.suppress(DuplicateKeyError):
            await Event.get_pymongo_collection().insert_one({
                "_id": effect_id(now, 0), "training": record.training, "type": "notification_failed",
                "round": int(record.body.get("round", 0)), "at": now, "user": receipt.user,
                "data": {"notification_type": record.notification_type, "error": error},
            })
        if record.round_notification:
            await self._engine.fail_running(record.training, {
                "reason": "notification_failed", "notification_type": record.notification_type,
                "user": str(receipt.user), "error": error})


async def purge_settled(now: datetime) -> int:
    """Remove settled records past their retention (what MongoDB's TTL index does; the embedded store has none)."""
    result = await Notification.get_pymongo_collection().delete_many(
        {"status": "settled", "expires_at": {"$lte": now}})
    return result.deleted_count

