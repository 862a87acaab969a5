"""``PREFIX/bin/serve`` replicas sharing one queue in a real PostgreSQL server (issue 34), on
the installed community-1 bundle with the real tiny.en weights: two replicas started as an
operator starts them (``bin/serve store init`` first, then each ``--store URL`` with the same
``--state-dir``), 20 jobs submitted to both, one replica SIGKILLed with a job in hand, the
database restarted under load, bad store URLs at start, and a replica as nobody under strace.

Every result is compared with what ``bin/transcribe`` wrote for the same recording (the
session's ``speech_ref``, tests/serve_helpers.py): the replicas are adapters over the same
code, so the two must be equal. The database is the session's ``postgres`` (tests/pg.py);
its password reaches libpq through ``PGPASSFILE``, as docs/serving.md tells operators.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import serve_helpers as sh
from e2e import CLEAN_ENV, NOBODY, connection_attempts
from pg import USER as PG_USER
from pg import PostgresServer, free_port
from serve_helpers import CLIPS, LONGER, Speech, post_job, wait_job, wait_running

from bundler.runtime import jobstore, stores

pytestmark = pytest.mark.slow

# Short enough that the SIGKILL test waits seconds, not a minute; long enough that a
# database restart (a few seconds) never costs a worker its job's lease.
LEASE_S = 20
JOBS = 20
AUDIO = "pyannote_serve_audio_seconds_total"


@dataclass
class Pair:
    """Two replicas of one queue: the database's URL, their shared state dir, the servers."""

    url: str
    state: Path
    servers: list[sh.Server]


@pytest.fixture(scope="module")
def pair(speech_ref: Speech, postgres: PostgresServer) -> Iterator[Pair]:
    """Two replicas, ``--workers 1`` each, on one fresh database and one state dir; the
    queue is sized for the 20 jobs (``--queue`` counts the whole shared queue)."""
    url = postgres.database()
    sh.store_init(speech_ref.prefix, url)
    state = speech_ref.state("replicas")
    with sh.replicas(speech_ref.prefix, state, 2, "--workers", "1", "--store", url,
                     "--queue", str(2 * JOBS), "--job-lease", str(LEASE_S)) as servers:
        yield Pair(url, state, servers)


def same_everywhere(servers: list[sh.Server], ref: Speech, job: str, name: str
                    ) -> dict[str, Any]:
    """The job's view, equal whichever replica answers, and its SRT, bin/transcribe's own
    from each replica; the view."""
    views = [s.request("GET", f"/v1/jobs/{job}").json() for s in servers]
    assert all(v == views[0] for v in views), views
    for server in servers:
        got = server.request("GET", f"/v1/jobs/{job}/result?format=srt")
        assert got.status == 200 and got.text == ref.srt(name), (name, got.body[:300])
    view: dict[str, Any] = views[0]
    return view


def delete_all(servers: list[sh.Server], jobs: list[str]) -> None:
    """Delete the jobs, each through the next replica; then none is listed anywhere."""
    for i, job in enumerate(jobs):
        assert servers[i % len(servers)].request("DELETE", f"/v1/jobs/{job}").status == 200
    for server in servers:
        assert server.request("GET", "/v1/jobs").json()["data"] == []


# --- 1. twenty jobs, two replicas, each job done once --------------------------------------
def test_twenty_jobs_on_two_replicas_are_each_done_once_as_bin_transcribe_does(
        pair: Pair, speech_ref: Speech) -> None:
    """20 jobs posted alternately to both replicas: each succeeded at its first attempt,
    each is listed once, both replicas' workers did some (their audio counters), the two
    counters add up to the jobs' audio exactly (a job done twice would count twice), and
    the status and SRT are the same, bin/transcribe's, whichever replica answers."""
    ref, servers = speech_ref, pair.servers
    before = [sh.metric(s, AUDIO) for s in servers]
    names = [list(CLIPS)[i % len(CLIPS)] for i in range(JOBS)]
    jobs = [post_job(servers[i % 2], ref, name) for i, name in enumerate(names)]
    for job in jobs:
        wait_job(servers[0], job)
    views = [same_everywhere(servers, ref, job, name)
             for job, name in zip(jobs, names, strict=True)]
    assert [(v["status"], v["attempts"]) for v in views] == [(jobstore.SUCCEEDED, 1)] * JOBS
    listed = [j["id"] for j in servers[1].request("GET", "/v1/jobs").json()["data"]]
    assert sorted(listed) == sorted(jobs), listed
    done = [sh.metric(s, AUDIO) - b for s, b in zip(servers, before, strict=True)]
    assert all(d > 0 for d in done), done  # both replicas took jobs from the one queue
    assert abs(sum(done) - sum(v["audio_seconds"] for v in views)) < 0.01 * JOBS, done
    delete_all(servers, jobs)
    assert servers[0].uploads() == []


# --- 2. the database restarted under load --------------------------------------------------
def test_a_database_restart_under_load_loses_nothing_accepted(
        pair: Pair, speech_ref: Speech, postgres: PostgresServer) -> None:
    """PostgreSQL stopped for about 5 s with jobs queued and running and a synchronous
    request in flight: every answer in the outage is 202/200 or a clear 503
    ``store_unavailable`` with Retry-After; the synchronous request waits it out; the same
    replica processes (no restart) take new jobs after it; every accepted job succeeds with
    bin/transcribe's result."""
    ref, servers = speech_ref, pair.servers
    pids = [s.server_pid() for s in servers]
    names = [LONGER, *CLIPS]
    jobs = {post_job(servers[i % 2], ref, name): name for i, name in enumerate(names)}
    wait_running(servers[0], next(iter(jobs)))
    answers: list[sh.Answer] = []
    with ThreadPoolExecutor(1) as pool:
        sync = pool.submit(servers[1].post_file, "/v1/audio/transcriptions",
                           ref.audio("station.wav"), "station.wav",
                           [("response_format", "srt")])
        time.sleep(0.5)  # the request is in, waiting for its answer
        postgres.pg_ctl("stop")
        stopped = time.monotonic()
        try:
            while time.monotonic() - stopped < 5:
                for i, server in enumerate(servers):
                    answers.append(server.request("GET", f"/v1/jobs/{list(jobs)[i]}",
                                                  timeout=90))
                    answers.append(server.post_file("/v1/jobs", ref.audio("lunch.wav"),
                                                    "lunch.wav", timeout=90))
                time.sleep(0.5)
        finally:
            postgres.pg_ctl("start")
        waited = sync.result(timeout=300)
    refused = [a for a in answers if a.status == 503]
    assert refused, [a.status for a in answers]  # the outage was felt
    for answer in refused:
        answer.error(503, "store_unavailable")
        assert answer.headers.get("retry-after") == "5", answer.headers
        assert b"127.0.0.1" not in answer.body  # where the database is stays in the log
    for answer in answers:
        if answer.status == 202:  # accepted in a moment the store answered: it must run
            jobs[answer.json()["id"]] = "lunch.wav"
        else:
            assert answer.status in (200, 503), (answer.status, answer.body[:300])
    if waited.status == 503:
        waited.error(503, "store_unavailable")
    else:
        assert waited.status == 200 and waited.text == ref.srt("station.wav"), waited.body
    # Reconnected without a restart: the same processes accept and finish new jobs.
    after = {post_job(s, ref, "weather.wav"): "weather.wav" for s in servers}
    for job, name in {**jobs, **after}.items():
        assert wait_job(servers[1], job)["status"] == jobstore.SUCCEEDED, job
        same_everywhere(servers, ref, job, name)
    assert [s.server_pid() for s in servers] == pids
    assert all(s.proc.poll() is None for s in servers)
    assert "Traceback" not in servers[0].stderr + servers[1].stderr
    delete_all(servers, [*jobs, *after])


# --- 3. one replica SIGKILLed with a job in hand ---------------------------------------------
def test_a_sigkilled_replicas_job_is_finished_by_the_other_after_its_lease(
        pair: Pair, speech_ref: Speech) -> None:
    """The replica whose worker holds a job is SIGKILLed: its workers die with it, the job
    waits out its lease (not taken sooner), the other replica's worker does it again
    (attempts 2) with bin/transcribe's result, and the other jobs are each done once."""
    ref, servers = speech_ref, pair.servers
    store = stores.open_store(pair.url, pair.state)
    try:
        long = post_job(servers[0], ref, LONGER)
        others = {post_job(servers[1], ref, name): name
                  for name in ("weather.wav", "station.wav")}
        wait_running(servers[0], long)
        held = store.get(long, None)
        assert held and held.worker and held.lease_until, held
        # A worker's id names its server's pid (serve.Pool.config).
        (victim,) = [s for s in servers if f"-{s.server_pid()}-" in held.worker]
        (survivor,) = [s for s in servers if s is not victim]
        workers = victim.workers()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(30)
        deadline = time.monotonic() + 15
        while any(sh.alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if sh.alive(w)], "a worker outlived its killed server"

        view = wait_job(survivor, long, timeout=LEASE_S + 300)
        assert view["status"] == jobstore.SUCCEEDED and view["attempts"] == 2, view
        again = store.get(long, None)
        assert again and again.started_at and again.started_at >= held.lease_until - 0.5, (
            "taken before its lease ran out", again, held.lease_until)
        same_everywhere([survivor], ref, long, LONGER)
        for job, name in others.items():
            other = wait_job(survivor, job)
            assert (other["status"], other["attempts"]) == (jobstore.SUCCEEDED, 1), other
            same_everywhere([survivor], ref, job, name)
        listed = [j["id"] for j in survivor.request("GET", "/v1/jobs").json()["data"]]
        assert sorted(listed) == sorted([long, *others]), listed
    finally:
        store.close()


# --- 4. a wrong or unreachable database at start ---------------------------------------------
def test_a_wrong_store_url_is_one_line_and_exit_3(speech_ref: Speech,
                                                  postgres: PostgresServer) -> None:
    """A closed port, an unknown database, a database without the schema: each refused at
    start in one line (the last one naming ``store init``), exit 3, no traceback, no server
    left listening, before any model loads."""
    closed = f"postgresql://{PG_USER}@127.0.0.1:{free_port()}/postgres"
    cases = {"closed-port": closed, "unknown-db": postgres.url("no_such_database"),
             "no-schema": postgres.database()}
    for name, url in cases.items():
        state = speech_ref.state(f"bad-{name}")
        started = time.monotonic()
        proc = subprocess.run([str(speech_ref.prefix / "bin" / "serve"), "--port", "0",
                               "--state-dir", str(state), "--store", url],
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 3 and len(lines) == 1, (name, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and "listening on" not in proc.stderr, name
        assert time.monotonic() - started < 60, name
        if name == "no-schema":
            assert "store init" in lines[0], lines


# --- 5. as nobody, under strace: the database and nothing else -------------------------------
def test_as_nobody_a_replica_connects_to_its_database_only(speech_ref: Speech,
                                                           postgres: PostgresServer) -> None:
    """A replica as nobody with no HOME, its password from a PGPASSFILE of its own, under
    strace in the namespace where the database listens (loopback of this host), for
    longer than onnxruntime's telemetry delay with jobs and a synchronous request: it
    connects to the database's address and port, and to nothing else."""
    ref = speech_ref
    nobody = pwd.getpwnam("nobody")
    url = postgres.database()
    sh.store_init(ref.prefix, url)
    home = ref.inst.base / "serve" / "replica-nobody"
    home.mkdir(parents=True)
    passfile = home / "pgpass"
    shutil.copyfile(postgres.passfile, passfile)
    for path, mode in ((home, 0o700), (passfile, 0o600)):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        path.chmod(mode)
    trace = ref.inst.base / "serve" / "replica.trace"
    wrap = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(trace),
            *NOBODY, *CLEAN_ENV, f"PGPASSFILE={passfile}")
    server = sh.start(ref.prefix, home / "state", "--store", url, wrap=wrap)
    try:
        (server.pid,) = sh.children(server.proc.pid)  # strace's child: the server
        uid = Path(f"/proc/{server.pid}/status").read_text().split("Uid:")[1].split()[0]
        assert uid == str(nobody.pw_uid)
        sh.wait_ready(server)
        ready = time.monotonic()
        job = post_job(server, ref, "station.wav")
        assert wait_job(server, job)["status"] == jobstore.SUCCEEDED
        same_everywhere([server], ref, job, "station.wav")
        while time.monotonic() - ready < 15:  # past onnxruntime's telemetry delay
            clip = server.post_file("/v1/audio/transcriptions", ref.audio("lunch.wav"),
                                    "lunch.wav", [("response_format", "srt")])
            assert clip.status == 200 and clip.text == ref.srt("lunch.wav"), clip.body
        assert server.request("DELETE", f"/v1/jobs/{job}").status == 200
        metrics = server.request("GET", "/metrics").text
        os.kill(server.pid, signal.SIGTERM)
        code = server.proc.wait(120)
    finally:
        if server.pid and sh.alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
        sh.stop_process(server.proc)
    assert code == 0, server.stderr[-2000:]
    assert "pyannote_serve_network_attempts 0.0" in metrics
    attempts = connection_attempts(trace)
    database = re.compile(rf'sin_port=htons\({postgres.port}\), '
                          r'sin_addr=inet_addr\("127\.0\.0\.1"\)')
    assert attempts, "no connect() to the database seen: is strace tracing the workers?"
    assert [ln for ln in attempts if not database.search(ln)] == [], attempts
