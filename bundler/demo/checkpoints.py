"""Random-weight pyannote checkpoints for the demo and the tests, made once per cache.

``make_checkpoints.py`` beside this module is a standalone script: it imports pyannote.audio
and torch, so it runs with the python of a helper venv installed offline from the default
recipe's locked wheels, never in the tool's own process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from bundler.build import find_lockfile, source_date_epoch
from bundler.errors import InstallError
from bundler.offline_install import make_venv
from bundler.spec import IndexOptions, load_recipe
from bundler.subproc import clean_env, last_lines, run
from bundler.wheels import bundle_lock, fetch_wheels

log = logging.getLogger("bundler")

RECIPE = "speaker-diarization-3.1"
SEED = 0
# What make_checkpoints.py writes for each recipe, relative to its output folder.
REPOS = {
    "speaker-diarization-3.1": ("pyannote/segmentation-3.0",
                                "pyannote/wespeaker-voxceleb-resnet34-LM"),
    "speaker-diarization-community-1": ("pyannote/speaker-diarization-community-1",),
}
COMPLETE = "pyannote/speaker-diarization-community-1/plda/plda.npz"  # written last


def checkpoints(cache_dir: Path, index: IndexOptions, seconds: dict[str, float] | None = None
                ) -> Path:
    """The folder of random-weight checkpoints for every recipe in ``REPOS``, made once per
    cache (keyed by the helper's lock) and reused."""
    seconds = {} if seconds is None else seconds
    # The checkpoints are always written by the default recipe's pyannote.audio 3.x: both
    # generations load them, and one helper venv serves every demo.
    default = load_recipe(RECIPE)
    wheels = fetch_wheels(find_lockfile(default), default.target, index,
                          cache_dir / "wheels", source_date_epoch())
    t = time.monotonic()
    lock = bundle_lock(wheels)
    key = hashlib.sha256(lock.encode()).hexdigest()[:16]
    ckpt = cache_dir / "demo" / f"checkpoints-{key}-seed{SEED}"
    if not (ckpt / COMPLETE).is_file():
        # The helper venv (about 7 GB with CUDA torch) lives only as long as it is needed:
        # the checkpoints it writes are what the cache keeps.
        helper = cache_dir / "demo" / f"venv-{key}"
        links = helper.with_name(helper.name + ".wheels")
        try:
            log.info("demo: 2/5 helper venv for the checkpoints: %s", helper)
            shutil.rmtree(helper, ignore_errors=True)
            shutil.rmtree(links, ignore_errors=True)
            links.mkdir(parents=True)
            for w in wheels:
                os.symlink(w.path.resolve(), links / w.filename)
            (links / "requirements.lock").write_text(lock)
            make_venv(sys.executable, helper, links, links / "requirements.lock",
                      compile_bytecode=False)  # removed once the checkpoints are written
            seconds["helper_venv"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            log.info("demo: 3/5 random-weight checkpoints (seed %d)", SEED)
            shutil.rmtree(ckpt, ignore_errors=True)
            script = Path(__file__).with_name("make_checkpoints.py")
            res = run([str(helper / "bin" / "python"), str(script), str(ckpt), "--seed",
                       str(SEED)], env={**clean_env(), "HF_HUB_OFFLINE": "1"})
            if res.returncode != 0:
                shutil.rmtree(ckpt, ignore_errors=True)
                raise InstallError(f"make_checkpoints.py failed: {last_lines(res.stderr)}")
        finally:
            shutil.rmtree(links, ignore_errors=True)
            shutil.rmtree(helper, ignore_errors=True)
    else:
        log.info("demo: 2-3/5 checkpoints from the cache: %s", ckpt)
    return ckpt
