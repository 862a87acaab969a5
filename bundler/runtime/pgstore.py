"""The shared job store: ``bin/serve --store postgresql://USER@HOST[:PORT]/DB``, for several
replicas (hosts, pods) that take jobs from one queue.

The SQL is ``jobstore.SQLStore``'s, as the embedded store runs it; this module only
connects, creates the schema (``bin/serve store init|migrate``), and claims with
``SELECT ... FOR UPDATE SKIP LOCKED`` so that two replicas never take the same job. A
replica that dies leaves its job's lease to run out: another claims it then.

The password never travels in the URL (every user reads a command line): libpq takes it
from ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``, and a URL that carries one is
refused. Messages name user, host, port and database, never a password.

psycopg 3 (``psycopg[binary]``, libpq in its wheel) is imported here only, and this module
only for a ``postgresql://`` store. Python 3.9.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .common import one_line
from .jobstore import SCHEMA_VERSION, SQLStore, StoreError, StoreUnavailable, schema_statements

CONNECT_TIMEOUT_S = 10
# pg_advisory_xact_lock's key for `store init|migrate`: two of them at once take turns.
MIGRATE_LOCK = 0x70796E6E  # "pynn"

try:
    import psycopg
except ImportError:  # a bundle built before the shared store: say so when one is asked for
    psycopg = None  # type: ignore[assignment]


def where(url: str) -> str:
    """``url`` as messages show it: ``postgresql://USER@HOST:PORT/DB``, no password, no
    query (libpq options can carry one too)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
    except ValueError:
        return "postgresql://(unparsable URL)"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def refuse_password(url: str) -> None:
    """A password in the URL would be on the command line (``ps``, shell history, the
    workers' arguments): refused, with where to put it instead."""
    try:
        parts = urlsplit(url)
        in_query = "password" in parse_qs(parts.query)
        in_url = parts.password is not None
    except ValueError:
        raise StoreError(f"--store {where(url)}: not a URL of the form "
                         "postgresql://USER@HOST[:PORT]/DB") from None
    if in_url or in_query:
        raise StoreError(f"--store {where(url)}: the URL carries a password, which every user "
                         "of this host can read on the command line: put it in ~/.pgpass, "
                         "a file named by PGPASSFILE, or PGPASSWORD, and drop it from the URL")


class _Connection:
    """One thread's psycopg connection, speaking the store's ``?`` placeholders; a
    connection error drops it (the next call connects again) and is a StoreUnavailable."""

    def __init__(self, store: PostgresStore, conn: Any) -> None:
        self.store, self.conn = store, conn

    def execute(self, sql: str, args: Any = ()) -> Any:
        with self.store.errors():
            return self.conn.execute(sql.replace("?", "%s"), tuple(args))


def _stale(conn: Any) -> bool:
    """A connection not to use again: closed, broken, or with something to read while idle,
    which is the server's goodbye (a restart, a terminated session); a notice read so costs
    a reconnection, nothing more. Checked before each use, so that after a database restart
    no request fails on a connection the server has already closed."""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class PostgresStore(SQLStore):
    """The jobs and keys in a PostgreSQL database that every replica shares."""

    LOCK_ROWS = " FOR UPDATE SKIP LOCKED"
    shared = True

    def __init__(self, url: str, check_schema: bool = True) -> None:
        if psycopg is None:
            raise StoreError(f"--store {where(url)}: this bundle's venv has no psycopg (a "
                             "bundle built before the PostgreSQL store: rebuild it)")
        refuse_password(url)
        self.url, self.where = url, where(url)
        self._local = threading.local()
        if check_schema:
            found = self.schema_version()
            command = f"bin/serve store %s --store {self.where}"
            if found is None:
                raise StoreError(f"{self.where} has no bin/serve schema yet: run "
                                 f"{command % 'init'}")
            if found > SCHEMA_VERSION:
                raise StoreError(f"{self.where} has schema {found}, newer than this bundle's "
                                 f"{SCHEMA_VERSION}: use the newer bin/serve")
            if found < SCHEMA_VERSION:
                raise StoreError(f"{self.where} has schema {found}, older than this bundle's "
                                 f"{SCHEMA_VERSION}: run {command % 'migrate'}")

    # --- connections ------------------------------------------------------------------
    @contextmanager
    def errors(self) -> Iterator[None]:
        """psycopg's errors as the store's: one line naming the database, never a password."""
        try:
            yield
        except psycopg.OperationalError as exc:
            self._drop()
            raise StoreUnavailable(f"cannot reach the job store {self.where}: "
                                   f"{self._redacted(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"the job store {self.where}: {self._redacted(exc)}") from None

    @staticmethod
    def _redacted(exc: BaseException) -> str:
        text = one_line(exc)
        secret = os.environ.get("PGPASSWORD")
        return text.replace(secret, "***") if secret else text

    def _db(self) -> _Connection:
        db = getattr(self._local, "db", None)
        if db is not None and _stale(db.conn):
            self._drop()
            db = None
        if db is None:
            with self.errors():
                conn = psycopg.connect(self.url, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT_S,
                                       application_name="pyannote-serve")
            db = self._local.db = _Connection(self, conn)
        return db

    def _drop(self) -> None:
        db = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            try:
                db.conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        db = self._db()
        with self.errors(), db.conn.transaction():
            yield db

    def close(self) -> None:
        self._drop()

    # --- the schema ---------------------------------------------------------------------
    def schema_version(self) -> int | None:
        """The schema's version in the database; None before ``store init``."""
        db = self._db()
        if db.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
            return None
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        return None if row is None else int(row[0])

    def migrate(self) -> tuple[int | None, int]:
        """Create the schema, or bring it to this bundle's version, in one transaction:
        ``(version found, version now)``. Run by ``bin/serve store init|migrate``."""
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
            found = self.schema_version()
            if found is not None and found > SCHEMA_VERSION:
                raise StoreError(f"{self.where} has schema {found}, newer than this bundle's "
                                 f"{SCHEMA_VERSION}: use the newer bin/serve")
            # Version 1 is the whole schema (CREATE ... IF NOT EXISTS); a later version adds
            # its steps here, each run when `found` is below it.
            for statement in schema_statements():
                db.execute(statement)
            db.execute("DELETE FROM meta WHERE key = 'schema'")
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        return found, SCHEMA_VERSION
