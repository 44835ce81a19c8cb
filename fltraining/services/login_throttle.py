"""Failed-login throttling, counted in the database so all processes agree.

Password guesses are counted per account: behind a reverse proxy every user arrives from one
address, so a per-address lock would shut everyone out (DLR's web frontend sends Basic auth on
every call). A much higher per-address ceiling stops guessing across many names.
"""

from datetime import timedelta

from fltraining.clock import utcnow
from fltraining.documents import LoginFailures
from fltraining.errors import TooManyRequests

KEY_CHARS = 200


class LoginThrottle:
    """Refuses password checks for an account, or from an address, after too many failures in a fixed window."""

    def __init__(self, account_limit: int, address_limit: int, window_seconds: int) -> None:
        self._limits = {"account": account_limit, "address": address_limit}
        self._window = window_seconds

    def _window_key(self, kind: str, name: str) -> tuple[str, int]:
        """The counter id for this account or address in the current window, and seconds until it ends."""
        now = int(utcnow().timestamp())
        start = now - now % self._window
        return f"{kind}:{name[:KEY_CHARS]}@{start}", start + self._window - now

    async def _check(self, kind: str, name: str) -> None:
        if self._limits[kind] <= 0:
            return
        key, remaining = self._window_key(kind, name)
        failures = await LoginFailures.get_pymongo_collection().find_one({"_id": key})
        if failures is not None and failures["failures"] >= self._limits[kind]:
            whose = "this account" if kind == "account" else "this address"
            raise TooManyRequests(f"Too many failed logins for {whose}; try again later.", remaining)

    async def _record(self, kind: str, name: str) -> None:
        """Count one failure (an atomic upsert, so concurrent failures are all counted)."""
        if self._limits[kind] <= 0:
            return
        key, remaining = self._window_key(kind, name)
        await LoginFailures.get_pymongo_collection().update_one(
            {"_id": key},
            {"$inc": {"failures": 1}, "$setOnInsert": {"expires_at": utcnow() + timedelta(seconds=remaining + 1)}},
            upsert=True,
        )

    async def check_password(self, username: str, address: str) -> None:
        """Raise 429 when the account, or the address, used up its failures in this window."""
        await self._check("account", username)
        await self._check("address", address)

    async def password_failed(self, username: str, address: str) -> None:
        """Count a wrong password against the account and the address."""
        await self._record("account", username)
        await self._record("address", address)

    async def token_failed(self, address: str) -> None:
        """Count an unknown token against the address (raising 429 past its ceiling)."""
        await self._check("address", address)
        await self._record("address", address)
