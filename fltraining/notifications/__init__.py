"""Notifications to participants' message endpoints."""
