"""Run by an installed bundle's venv python (tests/e2e.py): every engine of bin/diarize's
pipeline against pyannote's own, on the recordings named on the command line.

    VENV/bin/python engine_check.py PREFIX RELEASE_DIR WAV...

RELEASE_DIR holds a ``config.yaml`` (the test's: real segmentation weights) and
``smoke/sample.wav``; the onnx engine is exported there by the installed
``runtime/export.py``, as the installer does. For each recording: pyannote's RTTM and
embeddings (every (chunk, speaker) pair, from the pipeline's hook), then the same with
``pytorch`` and ``onnx``. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")
prefix, release = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(prefix / "runtime"))
# The installed runtime's modules, imported as its programs import them (runtime/_bootstrap.py).
__import__("_bootstrap").package(str(prefix / "runtime" / "recordings.py"))

import numpy as np  # noqa: E402
from pyannote_bundle_runtime import audio, engines, export, offline, outputs  # noqa: E402

offline.go_offline()

import torch  # noqa: E402
from pyannote.audio import Pipeline  # noqa: E402


def run(pipeline: Any, path: Path) -> dict[str, Any]:
    waveform = audio.decode(path)
    batches: list[np.ndarray] = []
    chunks = 0

    def hook(name: str, artifact: Any, file: Any = None, total: Any = None,
             completed: Any = None) -> None:
        nonlocal chunks
        if name == "embeddings" and artifact is not None:
            chunks += len(artifact)
            batches.append(np.asarray(artifact).reshape(-1, np.asarray(artifact).shape[-1]))

    started = time.perf_counter()
    output = pipeline({"waveform": torch.from_numpy(waveform)[None], "sample_rate": 16000,
                       "uri": path.stem}, hook=hook)
    annotation = getattr(output, "speaker_diarization", output)
    embeddings = np.concatenate(batches) if batches else np.zeros((0, 1))
    return {"rttm": outputs.rttm(path.stem, [
                {"start": round(float(t.start), 3), "end": round(float(t.end), 3),
                 "speaker": label} for t, _, label in annotation.itertracks(yield_label=True)]),
            "embeddings": embeddings, "chunks": chunks, "seconds": time.perf_counter() - started}


def unit(e: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    return e / np.maximum(norm, 1e-12)


def main() -> None:
    config = release / "config.yaml"
    onnx = export.export(release)
    export.write_receipt(release / engines.RECEIPT, onnx)
    pipelines = {}
    for name in ("pyannote", "pytorch", "onnx"):
        pipelines[name] = Pipeline.from_pretrained(str(config))
        pipelines[name].engine = engines.apply(pipelines[name], name, "cpu", None,
                                               release / engines.RECEIPT)
    unknown = Pipeline.from_pretrained(str(config))
    # An embedding model the fast path does not know (its class is not a WeSpeaker ResNet
    # it reproduces): pyannote's own path, and why.
    model = unknown._embedding.model_
    model.__class__ = type("OtherEmbedding", (type(model),), {})
    fallback = engines.apply(unknown, "pytorch", "cpu", None, None)
    results: dict[str, Any] = {"onnx_receipt": onnx, "fallback": fallback.report(),
                               "reports": {name: p.engine.report()
                                           for name, p in pipelines.items()},
                               "files": {}}
    for wav in sys.argv[3:]:
        path = Path(wav)
        ran = {name: run(p, path) for name, p in pipelines.items()}
        ref = ran["pyannote"]
        entry: dict[str, Any] = {"segments": len(ref["rttm"].splitlines()),
                                 "speakers": len({ln.split()[7]
                                                  for ln in ref["rttm"].splitlines()}),
                                 "pairs": len(ref["embeddings"]), "chunks": ref["chunks"]}
        for name in ("pytorch", "onnx"):
            got = ran[name]
            same_shape = got["embeddings"].shape == ref["embeddings"].shape
            diff = float(np.nanmax(np.abs(unit(got["embeddings"]) - unit(ref["embeddings"]))))\
                if same_shape and ref["embeddings"].size else 0.0
            entry[name] = {"rttm_identical": got["rttm"] == ref["rttm"],
                           "embeddings_shape_equal": same_shape,
                           "embedding_max_abs_diff": diff,
                           "nan_equal": bool(np.array_equal(np.isnan(got["embeddings"]),
                                                            np.isnan(ref["embeddings"]))),
                           "seconds": round(got["seconds"], 2)}
        entry["pyannote_seconds"] = round(ref["seconds"], 2)
        results["files"][path.name] = entry
    print(json.dumps(results), flush=True)


main()
