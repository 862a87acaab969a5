"""Stage: fetch each model file from the Hub at a commit, and prove its bytes.

huggingface_hub checks only sizes, so every file is hashed here and compared with the
sha256 pinned in the spec or, failing that, the LFS sha256 the Hub lists (small non-LFS
files are checked against their git blob id). A branch is resolved to its 40-hex commit
once, and every file is then fetched at that commit, so a push mid-build cannot mix
revisions.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bundler.errors import (
    CannotWrite,
    EntryNotFound,
    GatedRepo,
    HubError,
    ModelChecksumMismatch,
    RepoNotFound,
    RevisionNotFound,
)
from bundler.hashing import git_blob_sha1, sha256_file
from bundler.spec import SHA40, ModelRef

log = logging.getLogger("bundler")

DEFAULT_ENDPOINT = "https://huggingface.co"
RETRIES = 4  # attempts for each call, on transient faults (429, 5xx, dropped connections)
T = TypeVar("T")


@dataclass(frozen=True)
class FetchedFile:
    path: str  # in the repo
    bundle_path: str  # relative to models/
    sha256: str
    size: int
    local: Path  # where the verified bytes lie on the build host


@dataclass(frozen=True)
class FetchedModel:
    repo_id: str
    revision: str  # as asked
    commit: str  # as resolved
    role: str
    license: str
    files: tuple[FetchedFile, ...]


def fetch_models(models: Sequence[ModelRef], *, endpoint: str | None, token: str | None,
                 cache_dir: Path, sleep: Callable[[float], None] = time.sleep
                 ) -> list[FetchedModel]:
    """Download and verify every file of every model; raise a HubError on the first problem."""
    from huggingface_hub import HfApi

    endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token or False)
    out = []
    for model in models:
        info = _retry(lambda m=model: api.model_info(m.repo_id, revision=m.revision,  # type: ignore[misc]
                                                   files_metadata=True),
                      model, endpoint, None, sleep, cache_dir)
        commit = info.sha
        if not commit or not SHA40.match(commit):
            raise HubError(f"{model.repo_id}@{model.revision}: the Hub gave no commit id")
        if SHA40.match(model.revision) and commit != model.revision:
            raise HubError(f"{model.repo_id}: asked for commit {model.revision}, got {commit}")
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        files = []
        for f in model.files:
            sib = siblings.get(f.path)
            if sib is None and f.optional:
                continue
            if sib is None:
                raise EntryNotFound(model.repo_id, model.revision, f.path)
            lfs_sha = _lfs_sha256(sib)
            expected = f.sha256 or lfs_sha
            local = _retry(functools.partial(_download, model.repo_id, f.path, commit,
                                             endpoint, token, cache_dir),
                           model, endpoint, f.path, sleep, cache_dir)
            actual, size = sha256_file(local)
            if expected is not None:
                if actual != expected:
                    raise ModelChecksumMismatch(model.repo_id, f.path, expected, actual)
            else:
                blob = getattr(sib, "blob_id", None)
                if not blob:
                    raise HubError(f"{model.repo_id}/{f.path}: the Hub lists no hash for it; "
                                   "pin its sha256 in the spec")
                # Non-LFS files are small text files (config.yaml): read whole.
                got = git_blob_sha1(local.read_bytes())
                if got != blob:
                    raise ModelChecksumMismatch(model.repo_id, f.path, f"git:{blob}",
                                                f"git:{got}")
            log.info("models: %s/%s@%s ok (%d bytes)", model.repo_id, f.path, commit[:12], size)
            files.append(FetchedFile(f.path, f.bundle_path, actual, size, local))
        out.append(FetchedModel(model.repo_id, model.revision, commit, model.role,
                                model.license, tuple(files)))
    return out


def _download(repo_id: str, path: str, commit: str, endpoint: str, token: str | None,
              cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, path, revision=commit, cache_dir=str(cache_dir),
                                endpoint=endpoint, token=token or False)).resolve()


def _lfs_sha256(sibling: Any) -> str | None:
    lfs = getattr(sibling, "lfs", None)
    if lfs is None:
        return None
    sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    return str(sha) if sha else None


def _retry(call: Callable[[], T], model: ModelRef, endpoint: str, path: str | None,
           sleep: Callable[[float], None], cache_dir: Path) -> T:
    """Call, retrying transient faults with backoff; map the Hub's errors to ours.

    A local write that fails (disk full, no permission) is CannotWrite at once: neither
    a retry nor the Hub can fix it. Anything else that is not a network or Hub fault is a
    bug, and is left to surface as one."""
    delay = 1.0
    for attempt in range(1, RETRIES + 1):
        try:
            return call()
        except _network_errors() as exc:
            local = _local_cause(exc)
            if local is not None:
                raise _local_error(local, cache_dir) from None
            error = _classify(exc, model, endpoint, path)
            if error is not None:
                raise error from None
            if attempt == RETRIES:
                where = f"{model.repo_id}/{path}" if path else model.repo_id
                raise HubError(f"{where}: {_describe(exc)} after {RETRIES} attempts; "
                               f"check that {endpoint} is reachable and retry") from None
            log.warning("hub: %s (attempt %d of %d); retrying in %.0f s",
                        _describe(exc), attempt, RETRIES, delay)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """What a call to the Hub raises when the Hub or the network fails: the client's HTTP
    errors (requests for huggingface_hub 0.3x, httpx for 1.x and later), and OSError, which
    covers refused and reset connections, timeouts, the client's "no connection" error, and
    a local write that failed (told apart by its errno in ``_local_cause``)."""
    from huggingface_hub.errors import HfHubHTTPError

    found: list[type[BaseException]] = [HfHubHTTPError, OSError]
    try:
        import httpx
        found.append(httpx.HTTPError)
    except ImportError:
        pass
    try:
        import requests
        found.append(requests.RequestException)
    except ImportError:
        pass
    return tuple(found)


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 5:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _local_cause(exc: BaseException) -> OSError | None:
    """The failed local write behind ``exc`` (itself, or what it was raised from), if any."""
    for err in _chain(exc):
        if isinstance(err, OSError) and CannotWrite.matches(err):
            return err
    return None


def _local_error(exc: OSError, cache_dir: Path) -> CannotWrite:
    """One line for a model download that this host could not write."""
    _remove_partial(cache_dir)
    return CannotWrite("the model cache", cache_dir, exc, "--cache-dir")


def _remove_partial(cache_dir: Path) -> None:
    """Remove huggingface_hub's ``*.incomplete`` downloads: on a full disk they only take the
    space that the retry needs (0.3x keeps them to resume; 1.x and later remove them)."""
    try:
        partial = list(cache_dir.rglob("*.incomplete"))
    except OSError:
        return
    for p in partial:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass  # the error being reported already says what to fix


def _classify(exc: BaseException, model: ModelRef, endpoint: str,
              path: str | None) -> HubError | None:
    """A permanent failure as a HubError, or None when a retry may help."""
    from huggingface_hub import errors as e

    chain = _chain(exc)
    for err in chain:
        if isinstance(err, e.GatedRepoError):
            return GatedRepo(model.repo_id, endpoint)
        if isinstance(err, e.RepositoryNotFoundError):
            return RepoNotFound(model.repo_id)
        if isinstance(err, e.RevisionNotFoundError):
            return RevisionNotFound(model.repo_id, model.revision)
        if isinstance(err, e.EntryNotFoundError):
            return EntryNotFound(model.repo_id, model.revision, path or "?")
    for err in chain:
        status = _status(err)
        if status in (401, 403):
            return HubError(f"{model.repo_id}: access denied (HTTP {status}); check that "
                            "HF_TOKEN belongs to an account with access to this repo")
        if status == 404:
            what = f"file '{path}'" if path else "repository"
            return HubError(f"{model.repo_id}: {what} not found at {endpoint} (HTTP 404)")
        if status is not None and status not in (408, 429) and status < 500:
            return HubError(f"{model.repo_id}: the Hub answered HTTP {status}")
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    if status is None and exc.__cause__ is not None:
        status = _status(exc.__cause__)
    text = " ".join(str(exc).split())[:200]
    return f"HTTP {status}" if status else f"{type(exc).__name__}: {text}"
