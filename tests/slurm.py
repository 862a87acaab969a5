"""A real single-node Slurm for one test: Debian's ``slurm-wlm`` (22.05) and ``munge``, their
daemons started in the foreground from a folder of their own and stopped after.

Nothing global is touched: a generated munge key and socket, a ``slurm.conf`` naming this
host with the CPUs and memory ``slurmd -C`` finds, free loopback ports, state, spool and logs,
all in that folder; clients find the cluster through ``SLURM_CONF``. No cgroups are needed
(``proctrack/linuxproc``, ``task/none``): a container or a CI runner can host it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "diarize.md"
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
            "scancel", "sinfo")
# Job states after which a task does no more (squeue/scontrol's names).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (all held open until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass(frozen=True)
class Task:
    """One array task as scontrol reports it."""
    task_id: int
    state: str
    exit_code: int  # the batch script's exit status
    signal: int


@dataclass(frozen=True)
class Cluster:
    """A running single-node cluster; run its clients with ``env``."""
    root: Path
    env: Mapping[str, str]
    node: str

    def client(self, *argv: str, cwd: Path | None = None, user: tuple[str, ...] = (),
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (``user``: a prefix such as setpriv to run it as another
        user), with this cluster's environment plus ``env``."""
        return subprocess.run([*user, "env", "-i", *(f"{k}={v}" for k, v in
                                                      {**self.env, **(env or {})}.items()),
                               *argv], capture_output=True, text=True, cwd=cwd, timeout=60)

    def tasks(self, job_id: int) -> list[Task]:
        """Every task of array job ``job_id`` that Slurm has split out so far, by task id;
        a pending remainder (``ArrayTaskId=3-15``) is reported as one PENDING task."""
        proc = self.client("scontrol", "-o", "show", "job", str(job_id))
        assert proc.returncode == 0, proc.stderr
        found = []
        for line in proc.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            code, sig = fields["ExitCode"].split(":")
            task = fields.get("ArrayTaskId", "0")
            found.append(Task(int(task) if task.isdigit() else -1, fields["JobState"],
                              int(code), int(sig)))
        return sorted(found, key=lambda t: t.task_id)

    def wait(self, job_id: int, tasks: int, timeout: float) -> list[Task]:
        """Every task of ``job_id`` once all ``tasks`` of them have ended; fails after
        ``timeout`` seconds with their states and the daemons' last log lines."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.tasks(job_id)
            if len(found) == tasks and all(t.state in ENDED for t in found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout:.0f} s: {found}\n"
                                     + self.logs())
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace")
                                                     .splitlines()[-30:])
                         for p in sorted(self.root.glob("*.log")))


def node_line() -> tuple[str, str]:
    """This host as ``slurmd -C`` sees it: its short name, and the ``NodeName=`` line with
    its real CPUs, sockets, cores, threads and memory (a node configured with more than it
    has would be drained)."""
    proc = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName="))
    return line.split()[0].split("=", 1)[1], line


SLURM_CONF = """\
ClusterName=bundletest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
MaxArraySize=1001
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wait_for(what: str, ready: Callable[[], bool], timeout: float, root: Path,
              daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until ``ready()``; fails at once if a daemon has exited, else after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [name for name, proc in daemons.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                              for p in sorted(root.glob("*.log")))
            why = f"{' '.join(dead)} exited" if dead else f"not ready after {timeout:.0f} s"
            raise AssertionError(f"single-node Slurm: {what} {why}\n{tails}")
        time.sleep(0.5)


@contextmanager
def single_node_slurm(root: Path, start_timeout: float = 60) -> Iterator[Cluster]:
    """munged, slurmctld and slurmd started from ``root`` (world-traversable, so that any
    user can submit), the node idle; every job cancelled and every daemon stopped after."""
    missing = missing_programs()
    assert not missing, (f"Slurm is not installed here (missing: {' '.join(missing)}): "
                         "apt-get install --no-install-recommends slurm-wlm munge "
                         "(.ci/run installs them; the test starts its own daemons)")
    node, line = node_line()
    munge = root / "munge"
    for folder in (munge, root / "state", root / "spool"):
        folder.mkdir(parents=True)
    root.chmod(0o755)
    munge.chmod(0o755)
    subprocess.run(["mungekey", "--create", f"--keyfile={munge / 'munge.key'}"], check=True,
                   capture_output=True)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    ctld_port, slurmd_port = free_ports(2)
    conf.write_text(SLURM_CONF.format(node=node, node_line=line, root=root,
                                      ctld_port=ctld_port, slurmd_port=slurmd_port))
    conf.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SLURM_CONF": str(conf)}
    cluster = Cluster(root, env, node)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    with ExitStack() as stack:
        def daemon(name: str, *argv: str) -> None:
            log = stack.enter_context(open(root / f"{name}.out.log", "wb"))
            proc = subprocess.Popen([*argv], stdout=log, stderr=subprocess.STDOUT,
                                    env={**env}, start_new_session=True)
            daemons[name] = proc
            stack.callback(_stop, proc)

        daemon("munged", "munged", "--foreground", f"--key-file={munge / 'munge.key'}",
               f"--socket={munge / 'munge.socket.2'}", f"--pid-file={munge / 'munged.pid'}",
               f"--seed-file={munge / 'munged.seed'}")
        _wait_for("munged", (munge / "munge.socket.2").exists, start_timeout, root, daemons)
        daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
        _wait_for("slurmctld", lambda: "UP" in cluster.client("scontrol", "ping").stdout,
                  start_timeout, root, daemons)
        daemon("slurmd", "slurmd", "-D", "-N", node, "-f", str(conf))
        stack.callback(_cancel_all, cluster)
        _wait_for("slurmd", lambda: cluster.client(
            "sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle", start_timeout, root, daemons)
        yield cluster


def _cancel_all(cluster: Cluster) -> None:
    """No job outlives the test: cancel them all and wait until they are gone."""
    cluster.client("scancel", "--full", "--partition=batch")
    deadline = time.monotonic() + 30
    while cluster.client("squeue", "-h", "-o", "%i").stdout.strip():
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


@dataclass(frozen=True)
class JobArrayDoc:
    """docs/diarize.md's Slurm job array, as printed there."""
    script: str  # diarize.sbatch
    commands: str  # the shell lines shown after it, comments and all


def job_array_from_docs() -> JobArrayDoc:
    section = DOCS.read_text().split("\n### Slurm job array\n", 1)[1].split("\n### ", 1)[0]
    found = re.search(r"```sh\n(.*?)```\n(.*)", section, re.S)
    assert found, "docs/diarize.md: no ```sh block in the Slurm job array section"
    block = re.search(r"\n((?: {4}.*\n)+)", found.group(2))
    assert block, "docs/diarize.md: no indented commands after diarize.sbatch"
    commands = "".join(ln[4:] + "\n" for ln in block.group(1).splitlines())
    return JobArrayDoc(found.group(1), commands)


def docs_script_for_site(prefix: Path, corpus: Path, output: Path, tasks: int,
                         cpus: int) -> str:
    """docs/diarize.md's diarize.sbatch with a site's values where the docs have their own
    (each found there exactly once: a changed doc fails here, not in a job): the install
    prefix, corpus and output folders (shell-quoted), the array size and CPUs per task."""
    script = job_array_from_docs().script
    for old, new in (("/opt/pyannote/", shlex.quote(str(prefix)) + "/"),
                     ("/shared/corpus", shlex.quote(str(corpus))),
                     ("/shared/rttm", shlex.quote(str(output))),
                     ("--array=0-15", f"--array=0-{tasks - 1}"),
                     ("--cpus-per-task=4", f"--cpus-per-task={cpus}")):
        assert script.count(old) == 1, f"diarize.sbatch should hold {old!r} once:\n{script}"
        script = script.replace(old, new)
    return script
