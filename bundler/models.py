"""Stage: fetch each model file from the Hub at a commit, and prove its bytes.

huggingface_hub checks only sizes, so every file is hashed here and compared with the
sha256 pinned in the spec or, failing that, the LFS sha256 the Hub lists (small non-LFS
files are checked against their git blob id). A branch is resolved to its 40-hex commit
once, and every file is then fetched at that commit, so a push mid-build cannot mix
revisions.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bundler.errors import (
    EntryNotFound,
    GatedRepo,
    HubError,
    ModelChecksumMismatch,
    RepoNotFound,
    RevisionNotFound,
)
from bundler.spec import SHA40, ModelRef
from bundler.wheels import sha256_file

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
                      model, endpoint, None, sleep)
        commit = info.sha
        if not commit or not SHA40.match(commit):
            raise HubError(f"{model.repo_id}@{model.revision}: the Hub gave no commit id")
        if SHA40.match(model.revision) and commit != model.revision:
            raise HubError(f"{model.repo_id}: asked for commit {model.revision}, got {commit}")
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        files = []
        for f in model.files:
            sib = siblings.get(f.path)
            if sib is None:
                raise EntryNotFound(model.repo_id, model.revision, f.path)
            lfs_sha = _lfs_sha256(sib)
            expected = f.sha256 or lfs_sha
            local = _retry(functools.partial(_download, model.repo_id, f.path, commit,
                                             endpoint, token, cache_dir),
                           model, endpoint, f.path, sleep)
            actual, size = sha256_file(local)
            if expected is not None:
                if actual != expected:
                    raise ModelChecksumMismatch(model.repo_id, f.path, expected, actual)
            else:
                blob = getattr(sib, "blob_id", None)
                if not blob:
                    raise HubError(f"{model.repo_id}/{f.path}: the Hub lists no hash for it; "
                                   "pin its sha256 in the spec")
                if _git_blob_sha1(local) != blob:
                    raise ModelChecksumMismatch(model.repo_id, f.path, f"git:{blob}",
                                                f"git:{_git_blob_sha1(local)}")
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


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _retry(call: Callable[[], T], model: ModelRef, endpoint: str, path: str | None,
           sleep: Callable[[float], None]) -> T:
    """Call, retrying transient faults with backoff; map the Hub's errors to ours."""
    delay = 1.0
    for attempt in range(1, RETRIES + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as HubError
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


def _classify(exc: BaseException, model: ModelRef, endpoint: str,
              path: str | None) -> HubError | None:
    """A permanent failure as a HubError, or None when a retry may help."""
    from huggingface_hub import errors as e

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 5:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
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
