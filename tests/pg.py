"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a cluster of
its own in a temporary folder, on a free loopback port, run by a non-root user (PostgreSQL
refuses root), with password authentication over TCP as a site would configure it. The
password reaches libpq through ``PGPASSFILE``, as docs/serving.md tells operators.

Durability is switched off (fsync, synchronous_commit): these databases live for one test
session, and the store's tests stay fast.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "serve"  # the cluster's superuser, as the URL names it


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()`` a private cluster, ``database()`` a fresh database's URL, ``stop()``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pyannote-pg-"))  # not pytest's 0700 tree
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.passfile = self.root / "pgpass"
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(name)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.run_as = ["runuser", "-u", name, "--"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        proc = subprocess.run([*self.run_as, *argv], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}"
                               f"{log}")

    def start(self) -> None:
        pwfile = self.root / "initdb-password"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self.root.stat().st_uid, self.root.stat().st_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER,
                  f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        pwfile.unlink()
        self.passfile.write_text("".join(f"{host}:{self.port}:*:{USER}:{self.password}\n"
                                         for host in ("127.0.0.1", "localhost")))
        self.passfile.chmod(0o600)  # libpq ignores a password file others can read
        self.pg_ctl("start")

    def pg_ctl(self, action: str) -> None:
        """``start``, ``stop`` or ``restart`` (fast: sessions are cut, as a crash would)."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "60", "-m", "fast", action)

    def admin(self, sql: str) -> None:
        """Run ``sql`` as the superuser (CREATE/DROP DATABASE, cutting sessions)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def database(self) -> str:
        """A new, empty database's URL (no password in it: PGPASSFILE has it)."""
        name = "t_" + secrets.token_hex(6)
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.pg_ctl("stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
