"""The service's job store: what ``bin/serve`` accepted, who owns it, where it stands, its
result, and the API keys (their hashes). One small interface, so that the HTTP side and the
workers never see which database holds it; ``SQLiteStore`` is the embedded one (a file in
the state dir, stdlib ``sqlite3``, WAL); ``pgstore.PostgresStore`` is the shared one
(several ``bin/serve`` replicas on one PostgreSQL). Both run the same SQL (``SQLStore``):
only connecting, the schema's creation and claiming's row locks differ.

Durable by construction: a job is committed (``synchronous=FULL``) before the request that
made it is answered. A worker *claims* a job for a lease and renews it while it works; a
job whose lease ran out (its worker was killed) is claimed again by the next free worker,
at most ``MAX_ATTEMPTS`` times (a recording that kills its worker every time fails, instead
of killing workers for ever).

Standard library only, Python 3.9 (psycopg is imported by ``pgstore`` only, for a
``postgresql://`` store).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol
from urllib.parse import unquote

SCHEMA_VERSION = 1
MAX_ATTEMPTS = 3
QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)
DB_NAME = "serve.db"

WORKER_DIED = {"kind": "worker_died",
               "message": f"the worker processing it stopped {MAX_ATTEMPTS} times (killed, "
                          "or crashed on this recording)"}

# One schema for both engines: DOUBLE PRECISION is PostgreSQL's 8-byte float (its REAL has
# 4 bytes: timestamps would lose minutes) and has SQLite's REAL affinity.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  kind TEXT NOT NULL,
  params TEXT NOT NULL,
  filename TEXT NOT NULL,
  upload TEXT NOT NULL,
  sync INTEGER NOT NULL,
  status TEXT NOT NULL,
  progress DOUBLE PRECISION NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  worker TEXT,
  lease_until DOUBLE PRECISION,
  created_at DOUBLE PRECISION NOT NULL,
  started_at DOUBLE PRECISION,
  finished_at DOUBLE PRECISION,
  audio_seconds DOUBLE PRECISION,
  work_seconds DOUBLE PRECISION,
  error TEXT,
  result TEXT,
  speakers TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE TABLE IF NOT EXISTS keys (
  name TEXT PRIMARY KEY,
  hash TEXT NOT NULL UNIQUE,
  created_at DOUBLE PRECISION NOT NULL,
  revoked_at DOUBLE PRECISION
);
"""


class StoreError(Exception):
    """The store cannot be opened or used (a message for the operator)."""


class StoreUnavailable(StoreError):
    """The store's server cannot be reached right now (a network store restarting): the
    request gets 503, and the next call connects again."""


@dataclass
class Job:
    """One accepted recording and what became of it."""

    id: str
    owner: str
    kind: str  # "transcription" or "diarization"
    params: dict[str, Any]
    filename: str  # as the client named it: shown, never used as a path
    upload: str  # the upload's file name in the state dir's uploads/
    sync: bool  # a request waits for it: deleted once its answer is delivered
    status: str = QUEUED
    progress: float = 0.0
    attempts: int = 0
    worker: Optional[str] = None
    lease_until: Optional[float] = None
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    audio_seconds: Optional[float] = None
    work_seconds: Optional[float] = None
    error: Optional[dict[str, Any]] = None  # {"kind", "message"}
    result: Optional[dict[str, Any]] = None
    speakers: dict[str, str] = field(default_factory=dict)  # renamed labels

    def uploads(self) -> list[str]:
        """Every file of the job in the state dir's uploads/: its recording, and the others
        its params list (``files``: reference clips, a voice's further clips)."""
        return [self.upload, *(str(f) for f in self.params.get("files") or [])]


_COLUMNS = ("id", "owner", "kind", "params", "filename", "upload", "sync", "status",
            "progress", "attempts", "worker", "lease_until", "created_at", "started_at",
            "finished_at", "audio_seconds", "work_seconds", "error", "result", "speakers")
_JSON: dict[str, Any] = {"params": {}, "error": None, "result": None, "speakers": {}}
_LIGHT = ", ".join(c if c != "result" else "NULL AS result" for c in _COLUMNS)


def _row(job: Job) -> list[Any]:
    """``job``'s column values, as both engines store them (JSON as text, sync as 0/1)."""
    values = [getattr(job, c) for c in _COLUMNS]
    for i, name in enumerate(_COLUMNS):
        if name in _JSON:
            values[i] = json.dumps(values[i]) if values[i] or name == "params" else None
        elif name == "sync":
            values[i] = int(values[i])
    return values


def _job(row: Any) -> Job:
    values = dict(zip(_COLUMNS, row))
    for name, empty in _JSON.items():
        values[name] = json.loads(values[name]) if values[name] else empty
    values["sync"] = bool(values["sync"])
    return Job(**values)


class Store(Protocol):
    """What the service needs from a store; every method is one transaction."""

    def add_job(self, job: Job) -> None: ...
    def unfinished(self) -> int: ...
    def counts(self) -> dict[str, int]: ...
    def claim(self, worker: str, lease_s: float) -> Job | None: ...
    def renew(self, job_id: str, worker: str, lease_s: float) -> bool: ...
    def set_progress(self, job_id: str, worker: str, progress: float) -> bool: ...
    def finish(self, job_id: str, worker: str, result: dict[str, Any],
               audio_seconds: float, work_seconds: float) -> bool: ...
    def fail(self, job_id: str, worker: str, kind: str, message: str) -> bool: ...
    def release(self, job_id: str, worker: str) -> bool: ...
    def requeue_running(self) -> int: ...
    def expire_worker(self, worker: str) -> int: ...
    def get(self, job_id: str, owner: str | None, with_result: bool = True
            ) -> Job | None: ...
    def jobs(self, owner: str | None, limit: int = 100) -> list[Job]: ...
    def delete(self, job_id: str, owner: str | None) -> Job | None: ...
    def finished_before(self, when: float) -> list[Job]: ...
    def set_speakers(self, job_id: str, owner: str | None, names: dict[str, str]) -> bool: ...
    def add_key(self, name: str, digest: str) -> None: ...
    def revoke_key(self, name: str) -> bool: ...
    def keys(self) -> list[dict[str, Any]]: ...
    def key_owner(self, digest: str) -> str | None: ...
    def active_keys(self) -> int: ...
    def close(self) -> None: ...

    # Several servers share this store (a database server): none may requeue every running
    # job at start, and they share one uploads folder.
    shared: bool


class SQLStore(Store):
    """The store's SQL, one text for both engines. A subclass connects (``_db``: one
    connection per thread, autocommit outside ``_tx``), opens a transaction (``_tx``) and
    says how a claim locks the rows it takes (``LOCK_ROWS``)."""

    # SQLite serialises writers (BEGIN IMMEDIATE): nothing to add. PostgreSQL adds
    # "FOR UPDATE SKIP LOCKED", so that concurrent claims each take a different job.
    LOCK_ROWS = ""
    shared = False

    def _db(self) -> Any:
        raise NotImplementedError

    def _tx(self) -> Any:  # a context manager that yields the connection
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- jobs -------------------------------------------------------------------------
    def add_job(self, job: Job) -> None:
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                       f"({', '.join('?' for _ in _COLUMNS)})", _row(job))

    def unfinished(self) -> int:
        return int(self._db().execute(
            "SELECT count(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)
        ).fetchone()[0])

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, count(*) FROM jobs GROUP BY status")
        return {status: int(n) for status, n in rows}

    def claim(self, worker: str, lease_s: float) -> Job | None:
        now = time.time()
        with self._tx() as db:
            # A job whose worker died too often fails, rather than kill the next one. Rows
            # another claim holds are skipped (PostgreSQL): it fails them, or takes them.
            db.execute("UPDATE jobs SET status = ?, finished_at = ?, worker = NULL, error = ? "
                       "WHERE id IN (SELECT id FROM jobs WHERE status = ? AND lease_until < ? "
                       f"AND attempts >= ?{self.LOCK_ROWS})",
                       (FAILED, now, json.dumps(WORKER_DIED), RUNNING, now, MAX_ATTEMPTS))
            row = db.execute(
                f"SELECT {_LIGHT} FROM jobs WHERE status = ? OR (status = ? AND "
                f"lease_until < ?) ORDER BY created_at, id LIMIT 1{self.LOCK_ROWS}",
                (QUEUED, RUNNING, now)).fetchone()
            if row is None:
                return None
            job = _job(row)
            db.execute("UPDATE jobs SET status = ?, worker = ?, lease_until = ?, "
                       "attempts = attempts + 1, started_at = ?, progress = 0 WHERE id = ?",
                       (RUNNING, worker, now + lease_s, now, job.id))
        job.status, job.worker, job.attempts, job.started_at = RUNNING, worker, \
            job.attempts + 1, now
        return job

    def _mine(self, db: Any, sql: str, args: tuple[Any, ...], job_id: str,
              worker: str) -> bool:
        cur = db.execute(sql + " WHERE id = ? AND worker = ? AND status = ?",
                         (*args, job_id, worker, RUNNING))
        return cur.rowcount == 1

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        with self._tx() as db:
            return self._mine(db, "UPDATE jobs SET lease_until = ?", (time.time() + lease_s,),
                              job_id, worker)

    def set_progress(self, job_id: str, worker: str, progress: float) -> bool:
        with self._tx() as db:
            return self._mine(db, "UPDATE jobs SET progress = ?", (progress,), job_id, worker)

    def finish(self, job_id: str, worker: str, result: dict[str, Any],
               audio_seconds: float, work_seconds: float) -> bool:
        with self._tx() as db:
            return self._mine(
                db, "UPDATE jobs SET status = ?, progress = 1, finished_at = ?, result = ?, "
                    "audio_seconds = ?, work_seconds = ?, worker = NULL, lease_until = NULL",
                (SUCCEEDED, time.time(), json.dumps(result, ensure_ascii=False),
                 audio_seconds, work_seconds), job_id, worker)

    def fail(self, job_id: str, worker: str, kind: str, message: str) -> bool:
        with self._tx() as db:
            return self._mine(
                db, "UPDATE jobs SET status = ?, finished_at = ?, error = ?, worker = NULL, "
                    "lease_until = NULL",
                (FAILED, time.time(), json.dumps({"kind": kind, "message": message})),
                job_id, worker)

    def release(self, job_id: str, worker: str) -> bool:
        """Back to the queue, not counted as an attempt (a draining worker's job)."""
        with self._tx() as db:
            return self._mine(db, "UPDATE jobs SET status = ?, worker = NULL, lease_until = "
                                  "NULL, attempts = attempts - 1, progress = 0", (QUEUED,),
                              job_id, worker)

    def requeue_running(self) -> int:
        """Every running job back to the queue at once: for a store only this process's
        workers use (the SQLite one, under the state dir's lock), whose previous workers
        are all gone. Their attempt counts stay: a poisonous recording still fails."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET lease_until = 0 WHERE status = ?",
                              (RUNNING,)).rowcount

    def expire_worker(self, worker: str) -> int:
        """The jobs of a worker that died: claimable at once, not when their lease ends."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET lease_until = 0 WHERE status = ? AND worker = ?",
                              (RUNNING, worker)).rowcount

    def get(self, job_id: str, owner: str | None, with_result: bool = True) -> Job | None:
        columns = ", ".join(_COLUMNS) if with_result else _LIGHT
        sql = f"SELECT {columns} FROM jobs WHERE id = ?"
        args: list[Any] = [job_id]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        row = self._db().execute(sql, args).fetchone()
        return _job(row) if row else None

    def jobs(self, owner: str | None, limit: int = 100) -> list[Job]:
        sql = f"SELECT {_LIGHT} FROM jobs"
        args: list[Any] = []
        if owner is not None:
            sql += " WHERE owner = ?"
            args.append(owner)
        sql += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self._db().execute(sql, args)]

    def delete(self, job_id: str, owner: str | None) -> Job | None:
        with self._tx() as db:
            sql, args = f"SELECT {_LIGHT} FROM jobs WHERE id = ?", [job_id]
            if owner is not None:
                sql += " AND owner = ?"
                args.append(owner)
            row = db.execute(sql, args).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _job(row)

    def finished_before(self, when: float) -> list[Job]:
        rows = self._db().execute(
            f"SELECT {_LIGHT} FROM jobs WHERE status IN (?, ?) AND finished_at < ?",
            (SUCCEEDED, FAILED, when))
        return [_job(r) for r in rows]

    def set_speakers(self, job_id: str, owner: str | None, names: dict[str, str]) -> bool:
        with self._tx() as db:
            sql, args = "UPDATE jobs SET speakers = ? WHERE id = ?", [json.dumps(names), job_id]
            if owner is not None:
                sql += " AND owner = ?"
                args.append(owner)
            return db.execute(sql, args).rowcount == 1

    # --- keys -------------------------------------------------------------------------
    def add_key(self, name: str, digest: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT revoked_at FROM keys WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] is None:
                raise StoreError(f"a key named {name!r} exists: revoke it first "
                                 f"(bin/serve keys revoke {name})")
            # A revoked key's name takes a new key (portable SQL: no upsert).
            db.execute("DELETE FROM keys WHERE name = ?", (name,))
            db.execute("INSERT INTO keys VALUES (?, ?, ?, NULL)", (name, digest, time.time()))

    def revoke_key(self, name: str) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at "
                              "IS NULL", (time.time(), name)).rowcount == 1

    def keys(self) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT name, created_at, revoked_at FROM keys ORDER BY name")
        return [{"name": n, "created_at": c, "revoked_at": r} for n, c, r in rows]

    def key_owner(self, digest: str) -> str | None:
        row = self._db().execute("SELECT name FROM keys WHERE hash = ? AND revoked_at IS NULL",
                                 (digest,)).fetchone()
        return None if row is None else str(row[0])

    def active_keys(self) -> int:
        return int(self._db().execute(
            "SELECT count(*) FROM keys WHERE revoked_at IS NULL").fetchone()[0])


class SQLiteStore(SQLStore):
    """The embedded store: ``STATE_DIR/serve.db`` (0600, as the folder is 0700), WAL, one
    connection per thread; several processes (the server and its workers) share it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        try:
            with self._tx() as db:
                for statement in schema_statements():
                    db.execute(statement)  # executescript would commit on its own
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise StoreError(f"{path} has schema {row[0]}, newer than this bundle's "
                                     f"{SCHEMA_VERSION}: use the newer bin/serve")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job store {path}: {exc}") from None

    # --- connections ------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # Created private whatever the umask: recordings' transcripts live in it.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
            os.close(fd)
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def schema_statements() -> list[str]:
    """The schema's statements, one by one (each engine runs them in one transaction)."""
    return [statement.strip() for statement in _SCHEMA.split(";") if statement.strip()]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def store_hosts(url: str | None) -> list[str]:
    """The host names a shared store's URL names (libpq's ``HOST[:PORT][,HOST[:PORT]...]``
    and ``?host=``; socket folders aside): the ones a worker looks up to reach its store."""
    if not url or not url.startswith(POSTGRES_SCHEMES):
        return []
    rest = url.split("://", 1)[1]
    where, _, query = rest.partition("?")
    netloc = where.split("/", 1)[0].rpartition("@")[2]
    names = [unquote(name) for name in netloc.split(",")]
    for option in query.split("&"):
        key, _, value = option.partition("=")
        if key == "host":
            names += unquote(value).split(",")
    hosts = []
    for name in names:
        host = name[1:].partition("]")[0] if name.startswith("[") else name.partition(":")[0]
        if host and not host.startswith("/"):
            hosts.append(host)
    return hosts
