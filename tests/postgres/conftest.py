"""A real PostgreSQL server for the store tests: a fresh database per test.

The server is the one at env FLEETWATCH_TEST_PG (a DSN; default
postgresql://postgres@127.0.0.1:5432/postgres, trust auth); each test that asks for `pg_dsn`
gets `CREATE DATABASE fw_<random>` there, dropped afterwards. Without a reachable server the
PostgreSQL tests skip with a message saying so, unless FLEETWATCH_REQUIRE_POSTGRES=1 (CI),
where they fail instead.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Callable, Iterator

import psycopg
import pytest

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_dsn() -> str:
    return os.environ.get("FLEETWATCH_TEST_PG", DEFAULT_SERVER)


def with_dbname(dsn: str, dbname: str) -> str:
    """The URL DSN with another database name (query parameters kept)."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The server's DSN, once it answered; skips (or fails, in CI) when nothing answers."""
    dsn = server_dsn()
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return dsn
    except psycopg.Error as e:
        from aggregator.store.postgres import redact_dsn

        message = (f"no PostgreSQL at {redact_dsn(dsn)} ({str(e).strip().splitlines()[0]}); "
                   "set FLEETWATCH_TEST_PG to a server's DSN (a role that may CREATE "
                   "DATABASE) to run these tests")
    if os.environ.get("FLEETWATCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " (FLEETWATCH_REQUIRE_POSTGRES=1: required)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[Callable[[], str]]:
    """Factory: each call creates a fresh database and returns its DSN; all are dropped at
    teardown (with any sessions still connected to them)."""
    created: list[str] = []

    def create() -> str:
        name = f"fw_{secrets.token_hex(6)}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return with_dbname(pg_server, name)

    yield create
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_dsn(pg_database: Callable[[], str]) -> str:
    """A fresh, empty database on the test server (dropped after the test)."""
    return pg_database()
