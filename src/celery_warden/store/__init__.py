"""The embedded store: SQLite in WAL mode, versioned schema, bounded by retention."""

from __future__ import annotations

from celery_warden.store._read import list_sessions, read_snapshot
from celery_warden.store._schema import SCHEMA_VERSION
from celery_warden.store._store import Record, Store

__all__ = ["SCHEMA_VERSION", "Record", "Store", "list_sessions", "read_snapshot"]
