"""A short-lived, per-process memo of verified credentials.

The database stays the source of truth: an entry is trusted at most `ttl` seconds, so a deleted
user's credentials stop working within that time on every process (at once on the process
that deleted it). It spares a database round trip per request and, for Basic auth, a slow
password verification per request (the DLR frontend sends Basic credentials every time).
After `ttl` an entry still says which stored password hash these credentials matched: when the
user read again still has that hash, the password needs no slow verification.
"""

import hashlib
import hmac
import secrets
import time
from uuid import UUID

from fltraining.documents import User

MAX_ENTRIES = 10_000


class CredentialCache:
    """Maps a keyed hash of presented credentials to the user they proved, for `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._key = secrets.token_bytes(32)  # per process: entries cannot be precomputed
        self._entries: dict[str, tuple[float, User]] = {}

    def key(self, *parts: str) -> str:
        """The cache key of a credential (never the credential itself)."""
        message = "\0".join(parts).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def get(self, key: str) -> User | None:
        """The user proven by these credentials within the last `ttl` seconds."""
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] >= self._ttl:
            return None
        return entry[1]

    def proven(self, key: str) -> User | None:
        """The user as these credentials last proved it, however long ago (to be checked against a fresh read)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def put(self, key: str, user: User) -> None:
        """Remember a successful verification (trusted for `ttl`; with ttl 0 only as `proven`)."""
        self._entries.pop(key, None)  # a renewed entry goes to the back of the eviction order
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (time.monotonic(), user)

    def forget(self, key: str) -> None:
        """Drop one entry (its credentials were revoked here)."""
        self._entries.pop(key, None)

    def forget_user(self, user_id: UUID) -> None:
        """Drop every entry of a user (after it was deleted here)."""
        for key in [k for k, (_, user) in self._entries.items() if user.id == user_id]:
            del self._entries[key]
