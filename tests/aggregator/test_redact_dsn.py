"""`redact_dsn` masks every password libpq would read from a DSN (checked against libpq's own
parse, `psycopg.conninfo.conninfo_to_dict`), in the URI's userinfo, in its query string and
in a key=value conninfo string, and keeps the rest as written."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from aggregator.store.postgres import redact_dsn

# (DSN, the redacted form): each password is one libpq reads (asserted below).
CASES = [
    ("postgresql://fw:s3cr#t?pw@127.0.0.1:1/fleet", "postgresql://fw:***@127.0.0.1:1/fleet"),
    ("postgresql://fw:a#b@h/db?sslmode=require", "postgresql://fw:***@h/db?sslmode=require"),
    ("postgresql://fw:x:y:z@h:5432/db", "postgresql://fw:***@h:5432/db"),
    ("postgresql://fw:p%40ss%2Fw@h/db", "postgresql://fw:***@h/db"),
    ("postgres://fw:pw@h1:1,h2:2/db", "postgres://fw:***@h1:1,h2:2/db"),
    ("postgresql://u:pw@h:5/db?sslmode=require&password=pw2",
     "postgresql://u:***@h:5/db?sslmode=require&password=***"),
    ("postgresql://h/db?password=s3c%23r&application_name=x",
     "postgresql://h/db?password=***&application_name=x"),
    ("postgresql://h/db?sslpassword=keypw&sslmode=verify-full",
     "postgresql://h/db?sslpassword=***&sslmode=verify-full"),
    ("postgresql://h/db?pass%77ord=enc", "postgresql://h/db?pass%77ord=***"),
    ("host=h port=5 password=s3cr#t?pw user=fw", "host=h port=5 password=*** user=fw"),
    ("host=h password = 'sec ret\\' q' dbname=d", "host=h password = *** dbname=d"),
    ("sslpassword=kp host=h", "sslpassword=*** host=h"),
]


@pytest.mark.parametrize(("dsn", "redacted"), CASES)
def test_every_password_libpq_reads_is_masked(dsn: str, redacted: str) -> None:
    params = conninfo_to_dict(dsn)
    secrets = [params[k] for k in ("password", "sslpassword") if k in params]
    assert secrets, params   # the case is meaningful: libpq does read a password
    out = redact_dsn(dsn)
    assert out == redacted
    for secret in secrets:
        assert secret not in out
    host = str(params.get("host", ""))
    assert host.split(",")[0] in out      # still says which server it was


@pytest.mark.parametrize("dsn", [
    "postgresql://u@h/db", "postgres://h/db", "postgresql://h:5432/db?sslmode=require",
    "postgresql:///db?host=/var/run/postgresql", "host=h dbname=d user=u",
    "postgresql://h/db?sslcert=/etc/fw@prod/client.crt&sslmode=verify-full",
])
def test_a_dsn_without_a_password_is_unchanged(dsn: str) -> None:
    assert redact_dsn(dsn) == dsn


@pytest.mark.parametrize(("dsn", "secret"), [
    ("postgresql://fw:pa/ss@h/db", "pa/ss"),       # libpq fails on it; never logged anyway
    ("postgresql://fw:a@b@h/db", "a@b"),           # a raw '@': masked up to the last one
])
def test_a_malformed_userinfo_still_hides_the_password(dsn: str, secret: str) -> None:
    out = redact_dsn(dsn)
    assert secret not in out and out.startswith("postgresql://fw:***@") and out.endswith("/db")
