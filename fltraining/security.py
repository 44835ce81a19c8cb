"""Token and password hashing; secrets are never stored or logged in the clear."""

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

TOKEN_BYTES = 20  # 160 bits, printed as the 40 hex characters DLR clients expect


def new_token() -> str:
    """Return a fresh random API token."""
    return secrets.token_hex(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """Hash a token for storage and lookup (tokens are random, so one SHA-256 suffices)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def tokens_match(stored_hash: str, token: str) -> bool:
    """Constant-time comparison of a stored token hash with a presented token."""
    return hmac.compare_digest(stored_hash, token_hash(token))


class PasswordHashing:
    """Slow salted password hashes (Argon2id)."""

    def __init__(self, time_cost: int = 2) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=19_456, parallelism=1)
        # Verifying against this keeps unknown-user logins as slow as known-user ones.
        self._decoy = self._hasher.hash(secrets.token_hex(16))

    def hash(self, password: str) -> str:
        """Hash a password with a fresh salt."""
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check a password; a missing user still costs one full verification."""
        try:
            return self._hasher.verify(stored_hash or self._decoy, password) and stored_hash is not None
        except (VerificationError, InvalidHashError):
            return False
