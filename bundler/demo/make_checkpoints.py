"""Write format-true, random-weight pyannote.audio checkpoints (no network).

Run with the python of a venv that has pyannote.audio 3.x or 4.x installed::

    python make_checkpoints.py OUTDIR [--seed N]

It writes, in the Hugging Face Hub repositories' layout,

* ``OUTDIR/pyannote/segmentation-3.0/pytorch_model.bin``: PyanNet as segmentation-3.0
  (powerset, 3 speakers with at most 2 per frame, 10 s chunks, 16 kHz);
* ``OUTDIR/pyannote/wespeaker-voxceleb-resnet34-LM/pytorch_model.bin``: WeSpeakerResNet34;
* ``OUTDIR/pyannote/speaker-diarization-community-1/``: the community-1 repo's layout
  (``config.yaml`` with ``$model/...`` entries, ``segmentation/`` and ``embedding/`` holding
  the two checkpoints above, ``plda/xvec_transform.npz`` and ``plda/plda.npz``: a random
  256 -> 128 LDA and a random, well-conditioned 128-dim PLDA, in the arrays and shapes
  pyannote 4's ``vbx_setup`` reads).

Each file is a Lightning-style dict (``state_dict``, ``hyper_parameters``,
``pytorch-lightning_version``, and the ``pyannote.audio`` key filled in by the installed
``Model.on_save_checkpoint``), so ``Model.from_pretrained(path)`` loads it like the real one.
Weights are random but seeded: the same seed and versions give the same bytes.
Prints one JSON line: ``{"files": [{"path", "size", "sha256"}, ...], "seed": N}``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pyannote.audio.core.model import Model
from pyannote.audio.core.task import Problem, Resolution, Specifications
from pyannote.audio.models.embedding import WeSpeakerResNet34
from pyannote.audio.models.segmentation import PyanNet


def segmentation_model() -> Model:
    """PyanNet with segmentation-3.0's hyper-parameters and specifications."""
    model = PyanNet(
        sincnet={"stride": 10},
        lstm={
            "hidden_size": 128,
            "num_layers": 4,
            "bidirectional": True,
            "monolithic": True,
            "dropout": 0.5,
        },
        linear={"hidden_size": 128, "num_layers": 2},
        sample_rate=16000,
        num_channels=1,
    )
    model.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION,
        resolution=Resolution.FRAME,
        duration=10.0,
        min_duration=None,
        warm_up=(0.0, 0.0),
        classes=["speaker#1", "speaker#2", "speaker#3"],
        powerset_max_classes=2,
        permutation_invariant=True,
    )
    model.setup()  # build() the task-dependent classifier (7 powerset classes)
    return model


def embedding_model() -> Model:
    """WeSpeakerResNet34 as in pyannote/wespeaker-voxceleb-resnet34-LM (256-dim)."""
    model = WeSpeakerResNet34(sample_rate=16000, num_channels=1)
    model.specifications = Specifications(
        problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=5.0
    )
    model.setup()
    return model


def save(model: Model, path: Path) -> dict[str, Any]:
    """Save ``model`` the way a Lightning checkpoint of pyannote.audio looks."""
    checkpoint: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    model.on_save_checkpoint(checkpoint)  # adds the "pyannote.audio" key
    # 4.x no longer records the torch version, but 3.x's on_load_checkpoint reads it
    # (KeyError: 'torch'), and the Hub's files have it: keep it, as 3.x writes it.
    checkpoint["pyannote.audio"]["versions"].setdefault("torch", torch.__version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    data = path.read_bytes()
    return {"path": str(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# community-1's config.yaml, as published with pyannote.audio 4 (weights aside, the recipe's
# whole behaviour is in it).
COMMUNITY_CONFIG = Path(__file__).with_name("community-1-config.yaml")


def _orthonormal(rng: np.random.RandomState, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """np.savez, but with fixed zip timestamps: the same arrays give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue())
    data = path.read_bytes()
    return {"path": str(path), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def plda_files(folder: Path, seed: int) -> list[dict[str, Any]]:
    rng = np.random.RandomState(seed)
    transform = {"mean1": rng.normal(scale=0.1, size=256), "mean2": rng.normal(scale=0.1, size=128),
                 "lda": _orthonormal(rng, 256, 128)}
    plda = {"mu": rng.normal(scale=0.1, size=128), "tr": _orthonormal(rng, 128, 128),
            "psi": np.sort(rng.uniform(0.5, 5.0, size=128))[::-1].copy()}
    return [save_npz(folder / "xvec_transform.npz", transform),
            save_npz(folder / "plda.npz", plda)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = []
    for repo, build in (
        ("segmentation-3.0", segmentation_model),
        ("wespeaker-voxceleb-resnet34-LM", embedding_model),
    ):
        torch.manual_seed(args.seed)
        model = build().eval()
        files.append(save(model, args.outdir / "pyannote" / repo / "pytorch_model.bin"))
    community = args.outdir / "pyannote" / "speaker-diarization-community-1"
    for sub, repo in (("segmentation", "segmentation-3.0"),
                      ("embedding", "wespeaker-voxceleb-resnet34-LM")):
        (community / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.outdir / "pyannote" / repo / "pytorch_model.bin",
                        community / sub / "pytorch_model.bin")
    shutil.copyfile(COMMUNITY_CONFIG, community / "config.yaml")
    files += plda_files(community / "plda", args.seed)
    print(json.dumps({"files": files, "seed": args.seed}))


if __name__ == "__main__":
    main()
