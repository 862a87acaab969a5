"""``bin/serve``'s workers, seen from the server: the options each is started with, and the
pool that starts them from the event loop, restarts one that dies, wakes them when a job
arrives and drains them at the end (``worker.py`` is the other side).

Python 3.9; asyncio only (the server's event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import engines, transcribe


def worker_options(args: argparse.Namespace) -> list[str]:
    """The options each worker parses as bin/transcribe would; threads split between the
    workers unless given, so N workers do not fight over the same cores."""
    out = ["--max-duration", repr(args.max_duration), "--quiet"]
    threads = args.threads or max(1, engines.cpu_threads() // args.workers)
    out += ["--threads", str(threads)]
    names = ["config", "engine", "device", "embedding_batch_size", "segmentation_batch_size",
             "file_timeout"]
    if transcribe.bundled_model() is not None:  # the ASR options exist only with a model
        names += ["asr_threads", "compute_type", "beam_size"]
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


class Pool:
    """The workers: started from the event loop's (main) thread, so that each dies with
    this process (PR_SET_PDEATHSIG follows the thread that forked); restarted when one
    dies; told of new jobs by a byte on their stdin."""

    def __init__(self, service: Any, args: argparse.Namespace, say: Any) -> None:
        self.service, self.args, self.say = service, args, say
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.fatal: Optional[tuple[str, int]] = None
        self.failures = 0
        self.started = 0  # workers started: each gets an id of its own
        self.ids: dict[int, str] = {}

    def config(self, index: int) -> str:
        self.started += 1
        self.ids[index] = f"{socket.gethostname()}-{os.getpid()}-{index}.{self.started}"
        return json.dumps({"id": self.ids[index],
                           "parent": os.getpid(), "state_dir": str(self.args.state_dir),
                           "store": self.args.store, "lease": self.args.job_lease,
                           "options": worker_options(self.args),
                           "debug": self.args.debug})

    async def start(self) -> None:
        for i in range(self.args.workers):
            self.tasks.append(asyncio.ensure_future(self.keep(i)))

    async def keep(self, index: int) -> None:
        script = str(Path(__file__).with_name("worker.py"))
        backoff = 1.0
        while not self.stopping:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", script, self.config(index), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
            self.procs[index] = proc
            started = time.monotonic()
            assert proc.stdout is not None
            async for line in proc.stdout:
                self.event(index, line)
            code = await proc.wait()
            worker = self.ids[index]
            if code != 0:
                # Its job is claimable now, not only when its lease runs out.
                with contextlib.suppress(Exception):
                    await self.service.call(self.service.store.expire_worker, worker)
            self.procs.pop(index, None)
            self.ready.discard(index)
            self.service.worker_ready(len(self.ready))
            if self.stopping or self.fatal:
                return
            self.failures += 1
            self.say(f"worker {index} stopped (exit {code}); starting another")
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            await asyncio.sleep(backoff)

    def event(self, index: int, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind = event.get("event")
        if kind == "ready":
            first = not self.ready
            self.ready.add(index)
            self.service.worker_ready(len(self.ready))
            if first or len(self.ready) == self.args.workers:
                self.say(f"ready: {len(self.ready)}/{self.args.workers} worker(s) loaded the "
                         f"models in {event.get('seconds')} s on {event.get('device')} "
                         f"(engine {event.get('engine')})")
        elif kind == "finished":
            self.service.job_finished(event)
        elif kind == "fatal" and not self.ready:
            # The models cannot load: every worker would fail the same way. Stop.
            self.fatal = (str(event.get("message")), int(event.get("code") or 3))
            signal.raise_signal(signal.SIGTERM)

    def wake(self) -> None:
        for proc in list(self.procs.values()):
            if proc.stdin is not None and not proc.stdin.is_closing():
                with contextlib.suppress(Exception):
                    proc.stdin.write(b"\n")

    async def stop(self, timeout: float) -> None:
        """Drain: each worker finishes the job in hand and exits; after ``timeout`` the
        rest are killed, and their jobs go back to the queue."""
        self.stopping = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=timeout)
            for proc in list(self.procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=10)
