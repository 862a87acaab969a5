"""The loopback Hub against the real huggingface_hub client: protocol, errors and faults.

These tests also record what the client does with each fault (retry, resume, which exception),
because the model fetcher is built on those facts. Where huggingface_hub 0.3x and 1.x/2.x differ,
both behaviours are asserted so the suite states the truth for whichever is installed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from hubfaults import FaultyHub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from bundler.demo.hub import HubRepo, LoopbackHub

HF_MAJOR = int(huggingface_hub.__version__.split(".")[0])
TOKEN = "hf_loopback_secret_0123456789"
SEG = "segmentation/pytorch_model.bin"

# Format does not matter here, only bytes: small files in the community-1 layout, seeded so
# that a failure reproduces with the same commit sha.
_rng = random.Random(0)
FILES = {
    "config.yaml": b"pipeline:\n  name: pyannote.audio.pipelines.SpeakerDiarization\n",
    SEG: _rng.randbytes(64 * 1024),
    "embedding/pytorch_model.bin": _rng.randbytes(32 * 1024),
    "plda/plda.npz": _rng.randbytes(3000),
    "plda/xvec_transform.npz": _rng.randbytes(2000),
}
REPO = HubRepo("pyannote/tiny", FILES)
GATED = HubRepo("pyannote/gated", FILES, gated=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub() -> Iterator[FaultyHub]:
    with FaultyHub([REPO, GATED], tokens=[TOKEN]) as server:
        yield server


@pytest.fixture
def api(hub: LoopbackHub) -> HfApi:
    # endpoint= explicitly: the client reads HF_ENDPOINT once, at import.
    return HfApi(endpoint=hub.url, token=False)


def download(hub: LoopbackHub, tmp_path: Path, filename: str, revision: str = "main") -> bytes:
    path = hf_hub_download(
        REPO.repo_id,
        filename,
        revision=revision,
        cache_dir=tmp_path,
        endpoint=hub.url,
        token=False,  # never pick up a token from the machine running the tests
    )
    return Path(path).read_bytes()


def raw(hub: LoopbackHub, method: str, path: str, **headers: str) -> http.client.HTTPResponse:
    """One request with no client logic in between, to check the wire protocol itself."""
    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=5)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_branch_and_commit_resolve_to_the_same_bytes(
    hub: LoopbackHub, api: HfApi, tmp_path: Path
) -> None:
    info = api.model_info(REPO.repo_id)
    assert info.sha is not None and re.fullmatch(r"[0-9a-f]{40}", info.sha)
    assert info.sha == REPO.commit
    by_branch = download(hub, tmp_path / "a", SEG)
    by_commit = download(hub, tmp_path / "b", SEG, revision=REPO.commit)
    assert by_branch == by_commit == FILES[SEG]
    # X-Repo-Commit is what turns "main" into a snapshot folder named after the commit.
    assert (tmp_path / "a/models--pyannote--tiny/refs/main").read_text() == REPO.commit


def test_files_metadata_lists_sha256_of_lfs_files(api: HfApi) -> None:
    plain = api.model_info(REPO.repo_id)
    assert plain.siblings is not None
    assert sorted(s.rfilename for s in plain.siblings) == sorted(FILES)
    # As on the Hub, sizes and hashes come only with files_metadata=True (?blobs=true).
    assert all(s.size is None and s.lfs is None for s in plain.siblings)

    siblings = api.model_info(REPO.repo_id, files_metadata=True).siblings
    assert siblings is not None
    by_name = {s.rfilename: s for s in siblings}
    for name, content in FILES.items():
        entry = by_name[name]
        assert entry.size == len(content)
        if name.endswith((".bin", ".npz")):
            assert entry.lfs is not None
            assert entry.lfs.sha256 == sha256(content) and entry.lfs.size == len(content)
        else:
            assert entry.lfs is None
            assert entry.blob_id == git_sha1(content)


def test_snapshot_download_gets_every_file(hub: LoopbackHub, tmp_path: Path) -> None:
    folder = Path(
        snapshot_download(REPO.repo_id, cache_dir=tmp_path, endpoint=hub.url, token=False)
    )
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == FILES
    assert folder.name == REPO.commit


def test_tree_and_paths_info(api: HfApi) -> None:
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO.repo_id)}
    assert top == {
        ("RepoFile", "config.yaml"),
        ("RepoFolder", "embedding"),
        ("RepoFolder", "plda"),
        ("RepoFolder", "segmentation"),
    }
    files = {
        e.path: e
        for e in api.list_repo_tree(REPO.repo_id, recursive=True, revision=REPO.commit)
        if isinstance(e, RepoFile)
    }
    assert set(files) == set(FILES)
    lfs = files[SEG].lfs
    assert lfs is not None and lfs.sha256 == sha256(FILES[SEG])
    infos = api.get_paths_info(REPO.repo_id, ["plda/plda.npz", "plda", "missing.bin"])
    assert [(type(e).__name__, e.path) for e in infos] == [
        ("RepoFile", "plda/plda.npz"),
        ("RepoFolder", "plda"),
    ]


def test_wire_protocol(hub: LoopbackHub) -> None:
    head = raw(hub, "HEAD", f"/{REPO.repo_id}/resolve/main/{SEG}")
    assert head.status == 200
    assert head.headers["X-Repo-Commit"] == REPO.commit
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha256(FILES[SEG])}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(FILES[SEG]))
    assert head.headers["Accept-Ranges"] == "bytes"
    # Any X-Xet-* header would switch the client to the Xet protocol, which we do not speak.
    assert not [h for h in head.headers if h.lower().startswith("x-xet")]

    part = raw(hub, "GET", f"/{REPO.repo_id}/resolve/{REPO.commit}/{SEG}", Range="bytes=1000-")
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 1000-{len(FILES[SEG]) - 1}/{len(FILES[SEG])}"
    assert part.headers["Content-Length"] == str(len(FILES[SEG]) - 1000)

    small = raw(hub, "HEAD", f"/{REPO.repo_id}/resolve/main/config.yaml")
    assert small.headers["ETag"] == f'"{git_sha1(FILES["config.yaml"])}"'
    assert "X-Linked-Etag" not in small.headers

    # A pull-request ref arrives quoted as one segment: refused cleanly, as an unknown revision.
    pr = raw(hub, "HEAD", f"/{REPO.repo_id}/resolve/refs%2Fpr%2F1/config.yaml")
    assert (pr.status, pr.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert pr.headers["Content-Length"] != "0"
    entry = raw(hub, "GET", f"/{REPO.repo_id}/resolve/main/nope.txt")
    assert (entry.status, entry.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert entry.headers["X-Repo-Commit"] == REPO.commit


def test_gated_repo_needs_an_accepted_token(hub: LoopbackHub, api: HfApi, tmp_path: Path) -> None:
    def get(token: str | bool) -> str:
        return hf_hub_download(
            GATED.repo_id, "config.yaml", cache_dir=tmp_path, endpoint=hub.url, token=token
        )

    with pytest.raises(GatedRepoError, match="401") as no_token:
        get(False)
    assert "must have access to it and be authenticated" in str(no_token.value)
    with pytest.raises(GatedRepoError, match="401"):
        api.model_info(GATED.repo_id)
    with pytest.raises(GatedRepoError, match="403"):
        get("hf_not_on_the_list")

    assert Path(get(TOKEN)).read_bytes() == FILES["config.yaml"]
    folder = snapshot_download(GATED.repo_id, cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)
    assert (Path(folder) / SEG).read_bytes() == FILES[SEG]

    log = hub.requests
    assert [r["authorized"] for r in log[:2]] == [False, False]
    sent = [r for r in log if r["authorized"]]
    assert len(sent) >= 1 + len(FILES)  # the token travels with every request, http:// too
    assert all(
        r["headers"].get("Authorization", r["headers"].get("authorization")) == "<redacted>"
        for r in sent
    )
    assert TOKEN not in json.dumps(log) and "hf_not_on_the_list" not in json.dumps(log)


@pytest.mark.parametrize(
    ("repo_id", "revision", "filename", "error"),
    [
        ("pyannote/absent", "main", "config.yaml", RepositoryNotFoundError),
        (REPO.repo_id, "v9.9", "config.yaml", RevisionNotFoundError),
        (REPO.repo_id, "0" * 40, "config.yaml", RevisionNotFoundError),
        (REPO.repo_id, "main", "segmentation/missing.bin", EntryNotFoundError),
    ],
)
def test_missing_things_raise_the_clients_own_errors(
    hub: LoopbackHub, tmp_path: Path, repo_id: str, revision: str, filename: str, error: type
) -> None:
    with pytest.raises(error):
        hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=tmp_path, endpoint=hub.url, token=False
        )


def test_model_info_errors(api: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("pyannote/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO.repo_id, revision="v9.9")


def heads(hub: LoopbackHub) -> int:
    return sum(r["method"] == "HEAD" for r in hub.requests)


def test_429_on_download(hub: FaultyHub, tmp_path: Path) -> None:
    hub.inject(REPO.repo_id, "config.yaml", "429", "429")
    if HF_MAJOR >= 1:
        # The first HEAD never retries (fast fallback to the cache); with no cached copy it asks
        # again with backoff, which honours Retry-After (+1 s of its own).
        started = time.monotonic()
        assert download(hub, tmp_path, "config.yaml") == FILES["config.yaml"]
        assert time.monotonic() - started >= 1
        assert heads(hub) == 3
    else:
        # 0.3x retries a HEAD only on 5xx: a single 429 is fatal, and reads as "no connection".
        with pytest.raises(LocalEntryNotFoundError, match="check your connection"):
            download(hub, tmp_path, "config.yaml")
        assert heads(hub) == 1


@pytest.mark.parametrize("fault", ["500", "502", "503"])
def test_one_server_error_on_download_is_retried(
    hub: FaultyHub, tmp_path: Path, fault: str
) -> None:
    hub.inject(REPO.repo_id, "config.yaml", fault)
    assert download(hub, tmp_path, "config.yaml") == FILES["config.yaml"]
    assert heads(hub) == 2


@pytest.mark.parametrize("fault", ["429", "500", "503"])
def test_api_calls_are_not_retried(hub: FaultyHub, api: HfApi, fault: str) -> None:
    # model_info has no backoff in either major version: the fetcher must retry it itself.
    hub.inject(REPO.repo_id, None, fault)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO.repo_id)
    assert err.value.response.status_code == int(fault)
    assert api.model_info(REPO.repo_id).sha == REPO.commit


@pytest.mark.parametrize(("fault", "status"), [("403", 403), ("404", 404)])
def test_bare_403_and_404_read_as_no_connection(
    hub: FaultyHub, tmp_path: Path, fault: str, status: int
) -> None:
    # Without X-Error-Code the client cannot tell what went wrong and blames the network.
    hub.inject(REPO.repo_id, "config.yaml", fault)
    with pytest.raises(LocalEntryNotFoundError) as err:
        download(hub, tmp_path, "config.yaml")
    assert isinstance(err.value.__cause__, HfHubHTTPError)
    assert err.value.__cause__.response.status_code == status


def test_injected_401_is_a_gated_error(hub: FaultyHub, tmp_path: Path) -> None:
    hub.inject(REPO.repo_id, None, "401")
    with pytest.raises(GatedRepoError):
        download(hub, tmp_path, "config.yaml")
    assert download(hub, tmp_path, "config.yaml") == FILES["config.yaml"]


@pytest.mark.parametrize("size", [300 * 1024, 21 * 1024 * 1024], ids=["small", "over-10MiB"])
def test_dropped_connection(tmp_path: Path, size: int) -> None:
    content = os.urandom(size)
    big = HubRepo("pyannote/big", {"model.bin": content})
    with FaultyHub([big]) as server:
        server.inject(big.repo_id, "model.bin", "drop")

        def fetch() -> bytes:
            path = hf_hub_download(
                big.repo_id, "model.bin", cache_dir=tmp_path, endpoint=server.url, token=False
            )
            return Path(path).read_bytes()

        if HF_MAJOR >= 1:
            # Retried within the call after 1 s. Only whole 10 MiB chunks reach the disk, so the
            # retry asks for a Range only if one was written; otherwise it starts again from 0.
            assert fetch() == content
        else:
            # 0.3x gives up at once with the raw requests error, keeping the .incomplete file;
            # the next call resumes it with a Range.
            with pytest.raises(OSError, match="IncompleteRead"):
                fetch()
            assert fetch() == content
        ranges = [r["headers"].get("Range") for r in server.requests if r["method"] == "GET"]
    expected = "bytes=10485760-" if size > 20 * 1024 * 1024 else None
    assert ranges == [None, expected]


def test_corrupt_bytes_are_accepted_by_the_client(
    hub: FaultyHub, api: HfApi, tmp_path: Path
) -> None:
    hub.inject(REPO.repo_id, SEG, "corrupt")
    got = download(hub, tmp_path, SEG)
    siblings = {
        s.rfilename: s for s in api.model_info(REPO.repo_id, files_metadata=True).siblings or []
    }
    advertised = siblings[SEG].lfs
    assert advertised is not None
    # Same size, so the client's only check passes: whoever downloads must hash.
    assert len(got) == advertised.size
    assert sha256(got) != advertised.sha256 == sha256(FILES[SEG])
    if hasattr(api, "verify_repo_checksums"):  # 1.x/2.x: the client can check after the fact
        result = api.verify_repo_checksums(REPO.repo_id, cache_dir=tmp_path)
        assert [m["path"] for m in result.mismatches] == [SEG]


def test_hub_repo_commit_and_validation(tmp_path: Path) -> None:
    assert HubRepo("o/r", {"a": b"1"}).commit == HubRepo("o/r", {"a": b"1"}).commit
    assert HubRepo("o/r", {"a": b"1"}).commit != HubRepo("o/r", {"a": b"2"}).commit
    (tmp_path / "plda").mkdir()
    (tmp_path / "plda/plda.npz").write_bytes(b"x")
    (tmp_path / "config.yaml").write_bytes(b"y")
    repo = HubRepo.from_dir("o/r", tmp_path, branch="dev")
    assert dict(repo.files) == {"config.yaml": b"y", "plda/plda.npz": b"x"}
    for bad in ({"repo_id": "no-slash"}, {"commit": "abc"}, {"files": {"../x": b""}}):
        with pytest.raises(ValueError):
            HubRepo(**{"repo_id": "o/r", "files": {}, **bad})  # type: ignore[arg-type]
    with FaultyHub([repo]) as hub, pytest.raises(ValueError):
        hub.inject("o/r", None, "timeout")


def test_stop_closes_idle_keep_alive_connections() -> None:
    hub = LoopbackHub([REPO]).start()
    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=5)
    conn.request("GET", f"/api/models/{REPO.repo_id}")
    assert conn.getresponse().read()  # the connection now idles, kept alive by HTTP/1.1
    started = time.monotonic()
    hub.stop()
    hub.stop()  # idempotent
    assert time.monotonic() - started < 2
    with pytest.raises(OSError):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()


def test_command_line_serves_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_bytes(b"served\n")
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hubfaults.py")), "--repo",
         f"o/r={tmp_path}"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = ""
            while "Serving on" not in line:
                line = proc.stdout.readline()
                assert line, "server exited before printing its URL"
            url = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert url is not None
            path = hf_hub_download(
                "o/r", "config.yaml", cache_dir=tmp_path / "cache", endpoint=url[0], token=False
            )
            assert Path(path).read_bytes() == b"served\n"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()  # fail, not hang: the server ignored Ctrl-C
                raise
        assert proc.returncode == 0 and stderr == ""
