"""serve: who said what for everyone on the isolated network, as an OpenAI-compatible HTTP
service.

    PREFIX/bin/serve [--host 127.0.0.1] [--port 8000] [--state-dir DIR] [--workers N] ...
    PREFIX/bin/serve keys add|list|revoke NAME
    PREFIX/bin/serve store init|migrate --store postgresql://USER@HOST/DB

Shipped verbatim in every bundle (``runtime/serve.py``) and installed as ``PREFIX/bin/serve``.
Offline as ``bin/diarize`` is (the same environment, 0 connection attempts): one server
process speaks HTTP (``service.py``: Starlette on uvicorn) and keeps the job store
(``jobstore.py``: SQLite in the state dir); ``--workers`` processes (``worker.py``) each
load the models once, keep them warm, and take the jobs. A job is committed before its
request is answered, so nothing accepted is lost: a killed server's jobs run again when it
starts, a SIGTERM drains (the jobs in hand are finished; the queue waits in the store).

Keys: ``bin/serve keys add NAME`` prints a new key once, alone on stdout, and stores only
its hash. Without keys the server answers on loopback only.

Several hosts: ``--store postgresql://...`` puts the queue, results and keys in PostgreSQL
(``pgstore.py``), and replicas that share it and one state dir (a shared volume: the
uploads) take jobs from one queue; a replica's dead workers' jobs come back when their
leases run out, never by a restart of another replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Optional

if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    __package__ = __import__("_bootstrap").package(__file__)

from . import engines, exits, jobstore, stores, transcribe
from .audio import MAX_DURATION_S
from .common import one_line, shown
from .offline import NetworkAudit, go_offline
from .pool import Pool
from .worker import LEASE_S

EXIT_CANNOT_LISTEN = 6  # the address is taken, or not this host's
EXIT_CODES = {
    exits.EXIT_OK: "stopped cleanly (SIGTERM or Ctrl-C: the jobs in hand finished first)",
    exits.EXIT_INTERNAL: "internal error (rerun with --debug)",
    exits.EXIT_USAGE: "bad usage: arguments; a non-loopback --host with no keys",
    exits.EXIT_CANNOT_RUN: "cannot run: models, store or libraries unusable",
    exits.EXIT_OUTPUT: "the state dir cannot be made private or written",
    EXIT_CANNOT_LISTEN: "cannot listen on --host/--port",
}
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# What service.py names uploads: a job's recording, its other files (``.N``), while written.
UPLOAD_NAME = re.compile(r"^(\.)?[0-9a-f]{32}(\.[0-9]{1,2})?(\.part)?$")
# With a shared store, another replica may be writing an upload, or committing the job of
# one it has just renamed into place: only a file untouched this long, that no job names, is
# an orphan.
SHARED_ORPHAN_AGE_S = 3600
DRAIN_TIMEOUT_S = 600
CLEAN_EVERY_S = 3600


class Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/pyannote-serve``, else
    ``~/.local/state/pyannote-serve``: the keys and the server find the same one."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "pyannote-serve"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}': a size such as 500M or 2G")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def private_state_dir(path: Path) -> Path:
    """The state dir, made 0700 when this creates it; one another user can read is refused
    (recordings and transcripts live in it), never silently changed."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise Fail(f"--state-dir {path} is not a folder", exits.EXIT_OUTPUT)
        if st.st_mode & 0o077:
            raise Fail(f"--state-dir {path} is readable by others (mode "
                       f"{stat.S_IMODE(st.st_mode):04o}); recordings and transcripts live "
                       f"there: chmod 700 {path}", exits.EXIT_OUTPUT)
        (path / "uploads").mkdir(exist_ok=True, mode=0o700)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise Fail(f"cannot use --state-dir {path}: {exc.strerror or exc}",
                   exits.EXIT_OUTPUT) from None
    return path


def embedded(url: str | None) -> bool:
    """The store lives in the state dir (SQLite): that folder must be made first."""
    return not url or url.startswith("sqlite:")


def open_store(args: argparse.Namespace) -> jobstore.Store:
    try:
        return stores.open_store(args.store, args.state_dir)
    except jobstore.StoreError as exc:
        raise Fail(str(exc), exits.EXIT_CANNOT_RUN) from None


# --- keys ---------------------------------------------------------------------------------
def keys_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="serve keys", description=(
        "API keys for bin/serve. A key is shown once, when it is added, alone on stdout;\n"
        "the store keeps only its sha256. A client sends it as 'Authorization: Bearer KEY'\n"
        "(OpenAI(api_key=KEY)). With no key the server answers on loopback only."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  KEY=$(bin/serve keys add alice)\n  bin/serve keys list\n"
               "  bin/serve keys revoke alice\n")
    p.add_argument("action", choices=("add", "list", "revoke"))
    p.add_argument("name", nargs="?", help="the key's name (add, revoke): letters, digits, "
                                          "._@- ; each job belongs to its key's name")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help=f"the server's state dir (default: {default_state_dir()})")
    p.add_argument("--store", metavar="URL", help="the job store, as bin/serve --store")
    p.add_argument("--json", action="store_true", help="list: one JSON object")
    args = p.parse_args(argv)
    if args.action != "list" and not args.name:
        p.error(f"keys {args.action} needs a NAME")
    if args.name and not KEY_NAME.fullmatch(args.name):
        p.error(f"key name {shown(args.name)!r}: 1-64 letters, digits or ._@- ")
    if embedded(args.store):
        private_state_dir(args.state_dir)
    store = open_store(args)
    if args.action == "add":
        from .service import key_digest

        key = "pbk_" + secrets.token_urlsafe(32)
        try:
            store.add_key(args.name, key_digest(key))
        except jobstore.StoreError as exc:
            raise Fail(str(exc), exits.EXIT_USAGE) from None
        print(key, flush=True)
        print(f"serve: key '{args.name}' added; it is shown only this once: give it to its "
              "user over a private channel", file=sys.stderr)
    elif args.action == "revoke":
        if not store.revoke_key(args.name):
            raise Fail(f"no active key named '{args.name}' (bin/serve keys list)",
                       exits.EXIT_USAGE)
        print(f"serve: key '{args.name}' revoked: requests with it get 401 from now on",
              file=sys.stderr)
    else:
        keys = store.keys()
        if args.json:
            print(json.dumps({"keys": keys}))
        for k in keys if not args.json else []:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["created_at"]))
            state = "revoked" if k["revoked_at"] else "active"
            print(f"{k['name']}\t{state}\tadded {when} UTC")
    return exits.EXIT_OK


# --- the store's schema ------------------------------------------------------------------
def store_parser() -> argparse.ArgumentParser:
    """``serve store``'s options (also what the deployment docs' tests check a Job's
    arguments against)."""
    p = argparse.ArgumentParser(prog="serve store", description=(
        "Create (init) or bring up to date (migrate) the job store's schema in a shared\n"
        "PostgreSQL database, before the first bin/serve starts on it and after each\n"
        "update of the bundle; safe to run again, and from several hosts at once. The\n"
        "password comes from PGPASSWORD, PGPASSFILE or ~/.pgpass, never from the URL.\n"
        "The embedded SQLite store makes its schema itself."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  PGPASSFILE=/etc/pyannote/pgpass bin/serve store init "
               "--store postgresql://serve@db.example/pyannote\n")
    p.add_argument("action", choices=("init", "migrate"))
    p.add_argument("--store", metavar="URL", required=True,
                   help="postgresql://USER@HOST[:PORT]/DB, as bin/serve --store")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="for a sqlite:/// store only")
    return p


def store_main(argv: Sequence[str]) -> int:
    args = store_parser().parse_args(argv)
    if embedded(args.store):
        private_state_dir(args.state_dir)
    try:
        found, now = stores.init_store(args.store, args.state_dir)
    except jobstore.StoreError as exc:
        raise Fail(str(exc), exits.EXIT_CANNOT_RUN) from None
    was = "created" if found is None else ("already current" if found == now
                                           else f"migrated from version {found}")
    print(f"serve: the job store's schema is at version {now} ({was})", file=sys.stderr)
    return exits.EXIT_OK


# --- the server -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    model = transcribe.bundled_model()
    p = argparse.ArgumentParser(
        prog="serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "An OpenAI-compatible speech service, offline, with this bundle's models:\n"
            "POST /v1/audio/transcriptions (json, text, srt, vtt, verbose_json, "
            "diarized_json),\nPOST /v1/audio/diarization, jobs for long recordings "
            "(/v1/jobs), GET /v1/models,\n/healthz, /readyz, /metrics. Point any OpenAI "
            "client at it:\n  OpenAI(base_url='http://HOST:PORT/v1', api_key=KEY)\n"
            + ("This bundle serves transcription (" + model.repo + ") and diarization."
               if model else "This bundle has no speech-recognition model: it serves "
                             "diarization.")),
        epilog=("keys:\n  serve keys add NAME      a new key, printed once on stdout\n"
                "  serve keys list | revoke NAME\n"
                "  serve store init|migrate --store URL   a shared PostgreSQL store's "
                "schema\n"
                "examples:\n  serve                                  # 127.0.0.1:8000, "
                "no keys needed on loopback\n"
                "  serve keys add alice && serve --host 0.0.0.0 --workers 2\n"
                "  serve --tls-cert cert.pem --tls-key key.pem --host 0.0.0.0\n"
                "exit codes:\n" + "".join(f"  {c:>3}  {t}\n" for c, t in EXIT_CODES.items())))
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: 127.0.0.1; any other needs a key: "
                        "serve keys add NAME)")
    p.add_argument("--port", type=int, default=8000,
                   help="default: 8000; 0: any free port, named in the 'listening on' line")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="uploads, results, keys: private (0700), kept across restarts "
                        f"(default: {default_state_dir()})")
    p.add_argument("--store", metavar="URL",
                   help="the job store (default: sqlite in the state dir); "
                        "postgresql://USER@HOST[:PORT]/DB for replicas sharing one queue "
                        "(password from PGPASSWORD, PGPASSFILE or ~/.pgpass; first: serve "
                        "store init --store URL)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes that each load the models once and take jobs (default: 1)")
    p.add_argument("--queue", type=int, default=16, metavar="N",
                   help="recordings accepted beyond those in work; more get 429 with "
                        "Retry-After (default: 16)")
    p.add_argument("--max-upload", type=parse_size, default=parse_size("1G"), metavar="SIZE",
                   help="refuse a larger file (413) while it streams in (default: 1G)")
    p.add_argument("--max-duration", type=float, default=MAX_DURATION_S, metavar="SECONDS",
                   help=f"refuse a longer recording (413) while decoding it (default: "
                        f"{MAX_DURATION_S} s)")
    p.add_argument("--file-timeout", type=float, metavar="SECONDS",
                   help="give up on a recording after this long (as bin/transcribe)")
    p.add_argument("--keep-days", type=float, default=7.0, metavar="DAYS",
                   help="delete finished jobs, their recordings and results, after this "
                        "many days (default: 7; 0: keep until deleted)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this "
                   "certificate chain (and --tls-key); or put a reverse proxy in front")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's key")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="answer anyone, keys or not, on any --host (never on a shared network)")
    for flag, kw in (("--config", {"type": Path, "metavar": "YAML"}),
                     ("--engine", {"choices": engines.ENGINES}),
                     ("--device", {}), ("--threads", {"type": int, "metavar": "N"}),
                     ("--asr-threads", {"type": int, "metavar": "N"}),
                     ("--compute-type", {"metavar": "TYPE"}),
                     ("--beam-size", {"type": int, "metavar": "N"}),
                     ("--embedding-batch-size", {"type": int, "metavar": "N"}),
                     ("--segmentation-batch-size", {"type": int, "metavar": "N"})):
        p.add_argument(flag, help="as bin/transcribe's (each worker)", **kw)
    p.add_argument("--job-lease", type=float, default=LEASE_S, metavar="SECONDS",
                   help="a worker holds a job for this long and renews it every third of it; "
                        "a job whose replica died (SIGKILL, host lost) waits this long before "
                        f"another worker takes it (default: {LEASE_S:.0f})")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="SECONDS",
                   help="on SIGTERM, wait this long for the jobs in hand (default: "
                        f"{DRAIN_TIMEOUT_S}); what is left runs at the next start")
    p.add_argument("--debug", action="store_true", help="tracebacks and the server's log")
    return p


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def orphans(state: Path, store: jobstore.Store, min_age: float = 0.0) -> int:
    """Uploads no job names (a server killed while receiving one, a job deleted while its
    file was being written): only files named as this service names them, and untouched
    for ``min_age`` seconds (another replica's upload in flight is not an orphan)."""
    known = {name for j in store.jobs(None, limit=1 << 30) for name in j.uploads()}
    removed, before = 0, time.time() - min_age
    for entry in os.scandir(state / "uploads"):
        if UPLOAD_NAME.match(entry.name) and entry.name not in known and entry.is_file(
                follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime <= before:
            with contextlib.suppress(FileNotFoundError):  # another replica's sweep was first
                os.unlink(entry.path)
                removed += 1
    return removed


def lock_state_dir(state: Path, shared: bool) -> Any:
    """The state dir's lock, held while the server runs: an embedded store is one server's
    alone (exclusive); replicas of a shared store share the uploads folder (a shared lock),
    but never with a server whose store is embedded."""
    lock = open(state / "serve.lock", "a")
    try:
        fcntl.flock(lock, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        who = "a bin/serve with its own embedded store" if shared else "another bin/serve"
        raise Fail(f"{who} is using {state}: stop it, or give this one its own --state-dir",
                   exits.EXIT_USAGE) from None
    return lock


def recover(state: Path, store: jobstore.Store) -> tuple[int, int]:
    """At start: ``(jobs requeued, orphaned uploads removed)``. An embedded store is ours
    alone (the lock): its running jobs' workers are gone. A shared one's running jobs may be
    another replica's, at work: their leases say when they are not; and only old orphans go."""
    if store.shared:
        return 0, orphans(state, store, SHARED_ORPHAN_AGE_S)
    return store.requeue_running(), orphans(state, store)


def listen(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(False)
    except OSError as exc:
        raise Fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                   EXIT_CANNOT_LISTEN) from None
    return sock


def serve(args: argparse.Namespace) -> int:
    for name, least in (("workers", 1), ("queue", 0), ("port", 0), ("job_lease", 1)):
        if getattr(args, name) < least:
            raise Fail(f"--{name.replace('_', '-')} must be at least {least}",
                       exits.EXIT_USAGE)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Fail("--tls-cert and --tls-key go together", exits.EXIT_USAGE)
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise Fail(f"cannot read {path}", exits.EXIT_USAGE)
    try:
        import uvicorn

        from . import service as service_module
    except ImportError as exc:
        raise Fail(f"this bundle's venv cannot run the service: {one_line(exc)} (a bundle "
                   "built before bin/serve: rebuild it)", exits.EXIT_CANNOT_RUN) from None
    state = private_state_dir(args.state_dir)
    os.umask(0o077)  # uploads, results, the store: private, whatever the caller's umask
    store = open_store(args)
    lock = lock_state_dir(state, store.shared)  # noqa: F841 - held while the server runs
    if not loopback(args.host) and not args.insecure_no_auth and not store.active_keys():
        where = f"--store {args.store}" if store.shared else f"--state-dir {state}"
        raise Fail(f"--host {args.host} with no API key would answer anyone who can reach "
                   f"it: add one first (bin/serve keys add NAME {where}), or "
                   "--insecure-no-auth", exits.EXIT_USAGE)
    say = lambda line: print(f"serve: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if args.insecure_no_auth:
        say(f"WARNING: --insecure-no-auth: anyone who reaches {args.host}:{args.port} can "
            "send recordings and read every transcript")
    requeued, removed = recover(state, store)
    if requeued or removed:
        say(f"{requeued} job(s) interrupted by the last stop run again; {removed} orphaned "
            "upload(s) removed")
    model = transcribe.bundled_model()
    settings = service_module.Settings(
        state_dir=state, workers=args.workers, queue=args.queue, max_upload=args.max_upload,
        keep_days=args.keep_days, no_auth=args.insecure_no_auth,
        asr=({"repo": model.repo, "commit": model.commit} if model else None),
        pipeline=pipeline_name(), multilingual=model.multilingual if model else True)
    svc = service_module.Service(settings, store)
    pool = Pool(svc, args, say)
    svc.wake = pool.wake

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await pool.start()
        cleaner = asyncio.ensure_future(clean(svc, args.keep_days))
        try:
            yield
        finally:
            cleaner.cancel()
            say("stopping: the workers finish the recordings in hand")
            # One --drain-timeout for the whole stop: what uvicorn spent waiting for the
            # requests in flight (their jobs done by these workers) is not given twice.
            spent = time.monotonic() - (server.stop_asked or time.monotonic())
            await pool.stop(max(5.0, args.drain_timeout - spent))

    sock = listen(args.host, args.port)
    app = service_module.make_app(svc, lifespan)
    config = uvicorn.Config(app, log_level="info" if args.debug else "warning",
                            access_log=args.debug, lifespan="on", log_config=None,
                            ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
                            ssl_keyfile=str(args.tls_key) if args.tls_key else None,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = _stop_clock()(config)
    scheme = "https" if args.tls_cert else "http"
    port = sock.getsockname()[1]  # --port 0: the one the kernel chose
    say(f"listening on {scheme}://{args.host}:{port}/v1 ({args.workers} worker(s) "
        f"loading the models; state in {state})")
    # uvicorn re-raises the stop signal once it has shut down, with the handlers it found
    # restored: these make that a no-op, so a drained stop exits 0, not killed by SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
    if pool.fatal:
        raise Fail(f"the workers cannot start: {pool.fatal[0]}", pool.fatal[1])
    say("stopped")
    return exits.EXIT_OK


def _stop_clock() -> Any:
    import uvicorn

    class StopClock(uvicorn.Server):
        """uvicorn's server, noting when a stop was first asked for (SIGTERM, Ctrl-C)."""

        stop_asked: Optional[float] = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.stop_asked is None:
                self.stop_asked = time.monotonic()
            super().handle_exit(sig, frame)

    return StopClock


async def clean(svc: Any, keep_days: float) -> None:
    """Finished jobs older than --keep-days go, with their recordings and results."""
    while keep_days > 0:
        before = time.time() - keep_days * 86400
        try:
            for job in await svc.call(svc.store.finished_before, before):
                if await svc.call(svc.store.delete, job.id, None) is not None:
                    svc.discard_upload(job)
        except jobstore.StoreUnavailable:
            pass  # a shared store restarting: the next round cleans, the loop goes on
        await asyncio.sleep(CLEAN_EVERY_S)


def pipeline_name() -> str:
    try:
        manifest = json.loads((transcribe.prefix_root() / "manifest.json").read_text())
        for m in manifest.get("models") or []:
            if isinstance(m, dict) and m.get("role") == "pipeline":
                return str(m.get("repo"))
    except (OSError, ValueError, AttributeError):
        pass
    return "pyannote"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    go_offline()
    sys.addaudithook(NetworkAudit())
    debug = "--debug" in argv
    try:
        if argv[:1] == ["keys"]:
            return keys_main(argv[1:])
        if argv[:1] == ["store"]:
            return store_main(argv[1:])
        return serve(parser().parse_args(argv))
    except Fail as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return exits.EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug:
            import traceback

            traceback.print_exc()
        print(f"serve: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with "
              "--debug)", file=sys.stderr)
        return exits.EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
