"""The deployment files users apply (``docs/kubernetes/*.yaml``, the systemd drop-in in
``docs/systemd/``) say what the program really takes: each is parsed, and its image,
user, command, arguments, probes, paths and secrets are checked against ``bin/serve``'s own
parser, the service's routes, the image's constants and the store's password rules."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from bundler import image
from bundler.runtime import configure, pgstore, serve, service
from bundler.runtime.jobstore import StoreError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docs" / "kubernetes"
DROP_IN = ROOT / "docs" / "systemd" / "pyannote-serve.service.d" / "shared-store.conf"
SERVING = ROOT / "docs" / "serving.md"
README = ROOT / "README.md"
SERVE = f"/{image.PREFIX}/{configure.SERVE}"
IMAGE_UID = int(image.USER.split(":")[0])
IMAGE_GID = int(image.USER.split(":")[1])
# Peak RSS of one worker (a whole bin/transcribe: community-1 + tiny.en on the benchmark's
# dialogues, docs/benchmarks.md; 1.13 GB measured in a bin/serve worker after a 4 s clip)
# and of the server process beside the workers (35 MB measured): docs/serving.md#kubernetes.
WORKER_RSS = 1.73e9
SERVER_RSS = 64 * 2**20


def documents() -> dict[str, dict[str, Any]]:
    """Every object of every manifest, by ``Kind/name``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in out, f"{key} twice"
                out[key] = doc
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for k, d in documents().items() if k.startswith(kind + "/")]
    assert len(found) == 1, f"one {kind} expected, found {len(found)}"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each object that runs the image, with its pod spec."""
    for key, doc in documents().items():
        if doc["kind"] in ("Deployment", "Job"):
            yield key, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield key, doc["spec"]


def expanded(container: dict[str, Any]) -> list[str]:
    """The container's command line as the kubelet runs it: ``$(VAR)`` replaced by the env
    value, read from the Secret a ``secretKeyRef`` names."""
    values: dict[str, str] = {}
    for env in container.get("env") or []:
        if "value" in env:
            values[env["name"]] = env["value"]
        else:
            ref = env["valueFrom"]["secretKeyRef"]
            values[env["name"]] = documents()[f"Secret/{ref['name']}"]["stringData"][ref["key"]]

    def sub(arg: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)

    return [sub(a) for a in container.get("command", []) + container.get("args", [])]


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser without abbreviations: a file users keep must spell each option whole,
    or a later option sharing its prefix makes it ambiguous."""
    parser.allow_abbrev = False
    return parser


def server() -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The Deployment's pod spec, its serve container, and its arguments as bin/serve parses
    them."""
    spec = one("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    argv = expanded(container)
    assert argv[0] == SERVE, "the container runs the image's bin/serve"
    return spec, container, strict(serve.parser()).parse_args(argv[1:])


def under(path: str, folder: str) -> bool:
    return PurePosixPath(folder) in PurePosixPath(path).parents


def test_the_deployment_runs_serve_with_arguments_serve_accepts() -> None:
    deployment = one("Deployment")
    _, _, args = server()  # parse_args exits 2 on an option serve does not take
    assert deployment["spec"]["replicas"] >= 2
    assert not serve.loopback(args.host), "replicas must be reachable by the Service"
    assert args.store and not serve.embedded(args.store), "replicas share one store"
    assert args.workers >= 1


def test_the_store_init_job_runs_serve_store_init_on_the_deployments_store() -> None:
    job = one("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    argv = expanded(container)
    assert argv[0] == SERVE
    args = strict(serve.store_parser()).parse_args(argv[2:])
    assert argv[1] == "store" and args.action in ("init", "migrate")
    assert args.store == server()[2].store


def test_the_state_dir_is_inside_the_shared_claim_and_writable() -> None:
    spec, container, args = server()
    claim = one("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every replica mounts it"
    state = str(args.state_dir)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in container["volumeMounts"]
              if under(state, m["mountPath"]) or state == m["mountPath"]]
    assert mounts, f"--state-dir {state} is on no volume: the read-only root"
    deepest = max(mounts, key=lambda m: len(m["mountPath"]))
    source = volumes[deepest["name"]].get("persistentVolumeClaim")
    assert source and source["claimName"] == claim["metadata"]["name"]
    # A folder inside the volume, not its root: bin/serve refuses a state dir others can
    # read, and a volume's root gets the runtime's (or fsGroup's) mode.
    assert state != deepest["mountPath"]
    for mount in container["volumeMounts"]:
        if under(state, mount["mountPath"]) or under(mount["mountPath"], state) \
                or state == mount["mountPath"]:
            assert not mount.get("readOnly"), f"{mount['mountPath']} mounted read-only"
            claim_ref = volumes[mount["name"]].get("persistentVolumeClaim") or {}
            assert not claim_ref.get("readOnly")


def test_the_probes_are_routes_the_service_has_on_the_port_it_listens_on() -> None:
    _, container, args = server()
    routes = {(path, m) for path, _, _, methods in service.ROUTES for m in methods}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and (path, "GET") in routes
        port = get["port"]
        assert ports.get(port, port) == args.port, f"{probe} on {port}, serve on {args.port}"
    svc = one("Service")
    (port,) = svc["spec"]["ports"]
    target = port["targetPort"]
    assert ports.get(target, target) == args.port
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    for doc in documents().values():  # the admin pod is no endpoint
        if doc["kind"] == "Pod":
            assert not svc["spec"]["selector"].items() <= doc["metadata"]["labels"].items()


@pytest.mark.parametrize("key", [k for k, _ in pod_specs()])
def test_every_pod_runs_the_image_as_its_user_read_only_and_unprivileged(key: str) -> None:
    spec = dict(pod_specs())[key]
    images = {c["image"] for _, s in pod_specs() for c in s["containers"]}
    assert len(images) == 1, "one image (by digest) for the server, the Job and the admin pod"
    pod = spec["securityContext"]
    assert pod["runAsUser"] == IMAGE_UID and pod["runAsGroup"] == IMAGE_GID
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for container in spec["containers"]:
        assert container["command"][0].startswith(f"/{image.PREFIX}/")
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        # The image's HOME is /tmp: the libraries' caches (offline.cache_root) need it
        # writable under a read-only root.
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]] and not tmp[0].get("readOnly")
        assert "memory" in container["resources"]["limits"]


def test_the_password_comes_from_the_secret_as_the_variable_libpq_reads() -> None:
    secret = one("Secret")
    with pytest.raises(StoreError) as refused:
        pgstore.refuse_password("postgresql://serve:pw@db/pyannote")
    for key, spec in pod_specs():
        for container in spec["containers"]:
            env = {e["name"]: e for e in container["env"]}
            ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]
            assert "PGPASSWORD" in str(refused.value), "the store names where it reads it"
            # the URL the container gets carries no password: serve would refuse it
            url_ref = env["STORE_URL"]["valueFrom"]["secretKeyRef"]
            url = secret["stringData"][url_ref["key"]]
            assert url.startswith("postgresql://"), key
            pgstore.refuse_password(url)


def longest_stop(drain: float) -> float:
    """How long bin/serve may take to stop after SIGTERM: uvicorn waits up to
    ``timeout_graceful_shutdown`` (--drain-timeout) for the open requests, then the
    lifespan's ``Pool.stop`` up to --drain-timeout for the jobs in hand, and 10 s more."""
    return 2 * drain + 10


def test_the_grace_period_outlasts_the_drain() -> None:
    spec, _, args = server()
    assert spec["terminationGracePeriodSeconds"] > longest_stop(args.drain_timeout)


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m and m.group(2) in units, text
    return float(m.group(1)) * units[m.group(2)]


def test_the_resources_fit_the_workers_measured_memory_and_threads() -> None:
    _, container, args = server()
    res = container["resources"]
    need = SERVER_RSS + args.workers * WORKER_RSS
    assert _quantity(res["requests"]["memory"]) >= need
    assert _quantity(res["limits"]["memory"]) >= _quantity(res["requests"]["memory"])
    # Each worker's threads are its share of the cgroup's CPU quota (common.usable_cores):
    # without a CPU limit every worker would size its pools by the node's cores.
    assert _quantity(res["limits"]["cpu"]) >= args.workers
    assert _quantity(res["requests"]["cpu"]) == _quantity(res["limits"]["cpu"])


def drop_in(path: Path) -> list[tuple[str, str, str]]:
    """A systemd unit file as ``(section, key, value)`` in order (keys repeat: ``ExecStart=``
    empties the list a later ``ExecStart=`` fills)."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_the_systemd_drop_in_runs_serve_on_the_shared_store_and_folder() -> None:
    entries = drop_in(DROP_IN)
    service_keys = [(k, v) for s, k, v in entries if s == "Service"]
    starts = [v for k, v in service_keys if k == "ExecStart"]
    assert starts[0] == "" and len(starts) == 2, "a drop-in must empty ExecStart first"
    argv = shlex.split(starts[1])
    assert argv[0].endswith("/" + configure.SERVE)
    args = strict(serve.parser()).parse_args(argv[1:])
    assert not serve.loopback(args.host) and not serve.embedded(args.store)
    pgstore.refuse_password(args.store)
    state = str(args.state_dir)
    writable = [p for k, v in service_keys if k == "ReadWritePaths" for p in v.split()
                if under(state, p)]
    assert writable, "ProtectSystem=strict: the rest is read-only"
    mounts = [p for s, k, v in entries if s == "Unit" and k == "RequiresMountsFor"
              for p in v.split()]
    assert set(writable) & set(mounts), "start only once the shared folder is mounted"
    # the password file arrives as a credential, and PGPASSFILE names it
    creds = {v.split(":", 1)[0] for k, v in service_keys if k == "LoadCredential"}
    env = dict(e.split("=", 1) for k, v in service_keys if k == "Environment"
               for e in shlex.split(v))
    assert env["PGPASSFILE"] in {f"%d/{c}" for c in creds}
    # the unit configure.py installs stops the service no sooner than the drain ends
    unit = configure.systemd_unit(Path("/opt/pyannote"))
    stop = [v for k, v in service_keys if k == "TimeoutStopSec"] or \
        re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    assert float(stop[-1]) > longest_stop(args.drain_timeout)


def test_the_docs_link_every_deployment_file() -> None:
    serving = SERVING.read_text()
    files = sorted(K8S.glob("*.yaml")) + [DROP_IN]
    assert len(files) >= 6
    for path in files:
        rel = path.relative_to(SERVING.parent).as_posix()
        assert f"]({rel})" in serving, f"docs/serving.md does not link {rel}"
    assert "](docs/serving.md#kubernetes)" in README.read_text()
