"""Timestamps as MongoDB stores them: UTC, millisecond precision."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Return now in UTC, truncated to the millisecond BSON dates hold."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
