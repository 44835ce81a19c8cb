"""Failed-login throttling per client address, counted in the database so all processes agree."""

from datetime import timedelta

from fltraining.clock import utcnow
from fltraining.documents import LoginFailures
from fltraining.errors import TooManyRequests


class LoginThrottle:
    """Refuses credential checks from an address after too many failures in a fixed window."""

    def __init__(self, limit: int, window_seconds: int) -> None:
        self._limit = limit
        self._window = window_seconds

    def _window_key(self, address: str) -> tuple[str, int]:
        """The counter id for this address's current window, and seconds until it ends."""
        now = int(utcnow().timestamp())
        start = now - now % self._window
        return f"{address[:150]}@{start}", start + self._window - now

    async def check(self, address: str) -> None:
        """Raise 429 when the address already used up its failures in this window."""
        if self._limit <= 0:
            return
        key, remaining = self._window_key(address)
        failures = await LoginFailures.get_pymongo_collection().find_one({"_id": key})
        if failures is not None and failures["failures"] >= self._limit:
            raise TooManyRequests("Too many failed logins from this address; try again later.", remaining)

    async def record_failure(self, address: str) -> None:
        """Count one failed login (an atomic upsert, so concurrent failures are all counted)."""
        if self._limit <= 0:
            return
        key, remaining = self._window_key(address)
        await LoginFailures.get_pymongo_collection().update_one(
            {"_id": key},
            {"$inc": {"failures": 1}, "$setOnInsert": {"expires_at": utcnow() + timedelta(seconds=remaining + 1)}},
            upsert=True,
        )
