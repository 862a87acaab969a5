"""Throughput of ``bin/serve`` with one and two replicas on one PostgreSQL queue, and the
queue's overhead per job against the embedded SQLite store.

    python benchmarks/replicas.py --prefix PREFIX [--jobs N] [--store-jobs N] [--json]

PREFIX is an installed bundle with ``bin/serve`` (docs/benchmarks.md: the community-1 demo
bundle with tiny.en). Run it as root from a checkout: a private PostgreSQL cluster is
started for the run and removed after (tests/pg.py: Debian's ``postgresql`` binaries, run
by a non-root user), the recordings are espeak-ng dialogues (tests/speech.py), and the
servers are started and spoken to exactly as tests/test_e2e_replicas.py does
(tests/serve_helpers.py), so the benchmark measures what the tests prove.

* ``throughput``: ``--jobs`` async jobs (``POST /v1/jobs``) posted at once, to one replica
  with the embedded SQLite store, to one replica on PostgreSQL, and alternately to two
  replicas on the same PostgreSQL queue (``--workers 1`` each, default threads); audio hours
  per hour = the jobs' audio seconds over the wall seconds from the first POST to the last
  job finished. Every job must succeed, or the run says so and exits 1.
* ``queue_overhead``: one job's store calls as the service and a worker make them (add,
  claim, renew, finish with a transcript-sized result, get with the result, delete),
  median over ``--store-jobs`` jobs, through ``bundler.runtime.jobstore`` on SQLite (a file
  in a state dir) and on PostgreSQL (loopback, TCP, password authentication), and as a
  share of the median job's work seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pg  # noqa: E402 - the tests' helpers, found through the path above
import serve_helpers as sh  # noqa: E402
import speech  # noqa: E402

from bundler.runtime import jobstore, stores  # noqa: E402

# A transcript-sized result (about 20 segments with words), as a worker stores one.
RESULT: dict[str, Any] = {"segments": [
    {"start": float(i), "end": i + 0.9, "speaker": f"SPEAKER_0{i % 2}",
     "text": "the weather will be cold and windy tomorrow",
     "words": [{"start": i + k / 10, "end": i + k / 10 + 0.1, "word": w, "probability": 0.9}
               for k, w in enumerate("the weather will be cold and windy tomorrow".split())]}
    for i in range(20)]}


def recordings(folder: Path) -> list[Path]:
    """Five two-voice espeak-ng dialogues of about 8 s (two turns each)."""
    lines = speech.DEFAULT_LINES + speech.ASSET_LINES  # ten lines
    out = []
    for i in range(0, 10, 2):
        path = folder / f"turns-{i // 2}.wav"
        speech.dialogue(path, lines[i:i + 2])
        path.chmod(0o644)
        out.append(path)
    return out


def throughput(prefix: Path, state: Path, replicas: int, store: list[str], files: list[Path],
               jobs: int) -> dict[str, Any]:
    """``jobs`` jobs posted at once across ``replicas`` servers; audio hours per hour."""
    with sh.replicas(prefix, state, replicas, "--workers", "1", "--queue", str(2 * jobs),
                     *store) as servers:
        started = time.perf_counter()
        ids = []
        for i in range(jobs):
            path = files[i % len(files)]
            answer = servers[i % replicas].post_file("/v1/jobs", path.read_bytes(), path.name)
            assert answer.status == 202, answer.body
            ids.append(answer.json()["id"])
        views = [sh.wait_job(servers[0], job, timeout=3600) for job in ids]
        wall = time.perf_counter() - started
    failed = [v for v in views if v["status"] != jobstore.SUCCEEDED]
    audio = sum(v["audio_seconds"] or 0 for v in views)
    return {"replicas": replicas, "store": "postgresql" if store else "sqlite",
            "jobs": jobs, "failed": len(failed), "audio_seconds": round(audio, 1),
            "wall_seconds": round(wall, 1),
            "audio_hours_per_hour": round(audio / wall, 2),
            "median_work_seconds": round(statistics.median(
                v["timings"]["work_seconds"] or 0 for v in views), 3)}


def store_overhead(url: str | None, state: Path, count: int) -> float:
    """Median milliseconds of one job's store calls (see the module's docstring)."""
    store = stores.open_store(url, state)
    times = []
    try:
        for _ in range(count):
            job = jobstore.Job(id=os.urandom(16).hex(), owner="", kind="transcription",
                               params={"language": "en"}, filename="a.wav", upload="u",
                               sync=False)
            t0 = time.perf_counter()
            store.add_job(job)
            held = store.claim("bench", 60)
            assert held and held.id == job.id
            assert store.renew(job.id, "bench", 60)
            assert store.finish(job.id, "bench", RESULT, 8.0, 1.0)
            done = store.get(job.id, None, True)
            assert done and done.result
            assert store.delete(job.id, None)
            times.append(time.perf_counter() - t0)
    finally:
        store.close()
    return round(statistics.median(times) * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=Path, required=True, help="an install with bin/serve")
    p.add_argument("--jobs", type=int, default=20, help="jobs per throughput run")
    p.add_argument("--store-jobs", type=int, default=300, help="jobs for queue_overhead")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    bindir = pg.binaries()
    if bindir is None or not speech.have_espeak():
        print("benchmarks/replicas.py: needs postgresql and espeak-ng (apt-get install "
              "postgresql espeak-ng)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    work.chmod(0o755)
    server = pg.PostgresServer(bindir)
    report: dict[str, Any] = {"prefix": str(args.prefix), "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    try:
        server.start()
        os.environ["PGPASSFILE"] = str(server.passfile)
        files = recordings(work)
        runs = []
        for replicas, shared in ((1, False), (1, True), (2, True)):
            store: list[str] = []
            if shared:
                url = server.database()
                sh.store_init(args.prefix, url)
                store = ["--store", url]
            runs.append(throughput(args.prefix, work / f"state-{len(runs)}", replicas, store,
                                   files, args.jobs))
        report["throughput"] = runs
        (work / "sqlite").mkdir(mode=0o700)
        url = server.database()
        sh.store_init(args.prefix, url)
        sqlite_ms = store_overhead(None, work / "sqlite", args.store_jobs)
        pg_ms = store_overhead(url, work, args.store_jobs)
        work_s = runs[0]["median_work_seconds"]
        report["queue_overhead"] = {
            "jobs": args.store_jobs, "sqlite_ms": sqlite_ms, "postgresql_ms": pg_ms,
            "postgresql_share_of_work": round(pg_ms / 1000 / work_s, 4) if work_s else None}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for run in report["throughput"]:
            print(f"{run['replicas']} replica(s), {run['store']}: "
                  f"{run['audio_hours_per_hour']} audio h/h ({run['jobs']} jobs, "
                  f"{run['audio_seconds']} s of audio in {run['wall_seconds']} s)")
        q = report["queue_overhead"]
        print(f"queue overhead per job: sqlite {q['sqlite_ms']} ms, postgresql "
              f"{q['postgresql_ms']} ms")
    failed = sum(run["failed"] for run in report["throughput"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
