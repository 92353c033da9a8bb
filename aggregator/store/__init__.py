"""Aggregator storage behind one small interface (`Store`); SQLite is the embedded default,
PostgreSQL (`aggregator.store.postgres`) the database several replicas share."""

from __future__ import annotations

import pathlib

from aggregator.store.base import IngestOutcome, LabelSet, Store, canonical_labels, parse_labels
from aggregator.store.pool import READERS
from aggregator.store.sqlite import SqliteStore

__all__ = ["IngestOutcome", "LabelSet", "SqliteStore", "Store", "canonical_labels",
           "describe_db", "is_postgres_dsn", "open_store", "parse_labels"]

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_dsn(db: object) -> bool:
    """Whether ``db`` names a PostgreSQL database (a DSN) rather than a SQLite file."""
    return isinstance(db, str) and db.startswith(_PG_SCHEMES)


def open_store(db: str | pathlib.Path, *, forwarding: bool = False,
               readers: int = READERS) -> Store:
    """A ``postgresql://`` (or ``postgres://``) DSN opens `PostgresStore`, anything else is a
    SQLite file path (`SqliteStore`). An unreachable server or a bad DSN raises
    `agent.errors.ConfigError` naming the DSN without its password. ``forwarding``: a
    regional aggregator's store (records accepted reports in `forward_pending`). ``readers``:
    the bound on reader connections (`aggregator.store.pool`)."""
    if is_postgres_dsn(db):
        # Imported here: psycopg is only loaded by processes that use PostgreSQL.
        from aggregator.store.postgres import PostgresStore

        return PostgresStore(db, forwarding=forwarding, readers=readers)
    return SqliteStore(db, forwarding=forwarding, readers=readers)


def describe_db(db: str | pathlib.Path) -> str:
    """The database for logs and messages: a DSN without its password, or the path."""
    if is_postgres_dsn(db):
        from aggregator.store.postgres import redact_dsn

        return redact_dsn(db)
    return str(db)
