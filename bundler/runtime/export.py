"""The installer's ONNX export: the segmentation model and the embedding trunk of this
install's own checkpoints, exported with this venv's torch and checked against PyTorch on
the smoke sample, network disabled (segmentation scores and L2-normalised embeddings within
``engines.TOLERANCE``, the same RTTM). What it made and how it compared goes to
``engines.json``, which the ``onnx`` engine (``runtime/engines.py``) reads before it trusts
a file.

    python -I runtime/export.py RELEASE [--threads N]

Shipped verbatim in every bundle and run by ``install.py`` in the new release's venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    __package__ = __import__("_bootstrap").package(__file__)

from .common import sha256_file, write_atomic
from .engines import (
    CPU_PASSES,
    EMBEDDING_ONNX,
    ONNX_DIR,
    OPSET,
    RECEIPT,
    SEGMENTATION_ONNX,
    TOLERANCE,
    EngineUnavailable,
    OnnxForward,
    check_segmentation_model,
    cpu_threads,
    limit_native_pools,
    load_pyannote,
    ort_session,
    recognise,
    set_torch_threads,
    use_fast_embeddings,
    use_onnx,
)
from .offline import go_offline


def model_files(config: Path) -> dict[str, Path]:
    """The segmentation and embedding checkpoints ``config`` names (a file, or a folder
    holding ``pytorch_model.bin``; ``$model`` is the config's folder)."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    params = data.get("pipeline", {}).get("params", {})
    found = {}
    for role in ("segmentation", "embedding"):
        value = params.get(role)
        if isinstance(value, dict):
            value = str(Path(str(value.get("checkpoint", ""))) / str(value.get("subfolder", "")))
        if not isinstance(value, str):
            raise EngineUnavailable(f"{config} names no {role} checkpoint")
        path = Path(value.replace("$model", str(config.parent)))
        if not path.is_absolute():
            path = config.parent / path
        if path.is_dir():
            path = path / "pytorch_model.bin"
        if not path.is_file():
            raise EngineUnavailable(f"the {role} checkpoint {path} is not a file")
        found[role] = path
    return found


class _TrunkModule:
    """Built lazily (torch is imported late): the trunk as an nn.Module for the exporter."""

    @staticmethod
    def make(resnet: Any) -> Any:
        import torch

        class TrunkModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.resnet = resnet

            def forward(self, fbank: Any) -> Any:
                # forward_frames unsqueezes its input in place: never the caller's tensor.
                return self.resnet.forward_frames(fbank + 0)

        return TrunkModule().eval()


def to_onnx(module: Any, example: Any, path: Path, input_name: str, output_name: str,
            dynamic: dict[str, dict[int, str]]) -> dict[str, Any]:
    """``module`` exported with torch's TorchScript exporter (``dynamo=False``: dynamo
    fails on the models' ``hamming_window`` and ``asteroid_filterbanks``' clamp) to ``path``,
    atomically; its sha256 and size."""
    import io

    import torch

    module.eval()
    buffer = io.BytesIO()
    with _without_onnxscript_functions(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=[input_name],
                          output_names=[output_name], dynamic_axes=dynamic,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    module.eval()  # the exporter restores the wrapper's mode: keep every layer in eval
    data = buffer.getvalue()
    write_atomic(path, data, mode=0o644)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


class _without_onnxscript_functions:
    """torch 2.8's TorchScript exporter ends by inserting custom onnxscript functions into
    the model, and imports the ``onnx`` package to do it even when there are none. These
    models have none, and the bundles do not carry ``onnx``: without it, that step is
    skipped (the bytes are the exporter's own). What comes out is checked against PyTorch
    before it is used."""

    def __enter__(self) -> None:
        from torch.onnx._internal import onnx_proto_utils

        self.module = onnx_proto_utils
        self.original = getattr(onnx_proto_utils, "_add_onnxscript_fn", None)
        try:
            import onnx  # noqa: F401
        except ImportError:
            if self.original is not None:
                onnx_proto_utils._add_onnxscript_fn = lambda proto, custom_opsets: proto

    def __exit__(self, *exc: Any) -> None:
        if self.original is not None:
            self.module._add_onnxscript_fn = self.original


def export(release: Path, threads: int | None = None) -> dict[str, Any]:
    """Export the segmentation model and the embedding trunk of ``release``'s pipeline to
    ONNX, then check them against PyTorch on the smoke sample: segmentation scores and
    L2-normalised embeddings within TOLERANCE, and the same RTTM. The receipt's ``onnx``
    entry; ``ok`` is true only when everything matched."""
    threads = cpu_threads(threads)
    limit_native_pools(threads)
    import numpy as np
    import soundfile
    import torch
    from pyannote.audio import __version__ as pyannote_version

    Pipeline = load_pyannote()  # without onnxruntime: the onnx engine loads it

    set_torch_threads(torch, threads)
    config = release / "config.yaml"
    checkpoints = model_files(config)
    reference = Pipeline.from_pretrained(str(config))
    candidate = Pipeline.from_pretrained(str(config))
    recognise(reference)
    check_segmentation_model(reference._segmentation.model)
    seg_model = reference._segmentation.model.eval()
    emb_model = reference._embedding.model_.eval()
    sample_rate = emb_model.hparams.sample_rate
    chunk = int(round(seg_model.specifications.duration * seg_model.hparams.sample_rate))
    out_dir = release / ONNX_DIR
    with torch.inference_mode(False), torch.no_grad():
        seg_entry = to_onnx(seg_model, torch.zeros(2, 1, chunk), out_dir / SEGMENTATION_ONNX,
                            "chunks", "scores", {"chunks": {0: "batch"},
                                                 "scores": {0: "batch"}})
        fbank = emb_model.compute_fbank(torch.zeros(2, 1, sample_rate * 10))
        emb_entry = to_onnx(_TrunkModule.make(emb_model.resnet), fbank,
                            out_dir / EMBEDDING_ONNX, "fbank", "frames",
                            {"fbank": {0: "batch", 1: "frames"}, "frames": {0: "batch"}})
    seg_entry["path"] = f"{ONNX_DIR}/{SEGMENTATION_ONNX}"
    emb_entry["path"] = f"{ONNX_DIR}/{EMBEDDING_ONNX}"
    receipt: dict[str, Any] = {
        "ok": False, "segmentation": seg_entry, "embedding": emb_entry,
        "segmentation_checkpoint": {"path": str(checkpoints["segmentation"]),
                                    "sha256": sha256_file(checkpoints["segmentation"])},
        "embedding_checkpoint": {"path": str(checkpoints["embedding"]),
                                 "sha256": sha256_file(checkpoints["embedding"])},
        "exporter": "torch.onnx TorchScript (dynamo=False)", "opset": OPSET,
        "torch": str(torch.__version__), "pyannote_audio": str(pyannote_version),
        "tolerance": TOLERANCE,
    }
    import onnxruntime

    receipt["onnxruntime"] = str(onnxruntime.__version__)
    audio, rate = soundfile.read(str(release / "smoke" / "sample.wav"), dtype="float32",
                                 always_2d=True)
    waveform = torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))[None]
    # Segmentation scores on the sample's chunks, and the trunk's embeddings, side by side.
    seg_session = ort_session(out_dir / SEGMENTATION_ONNX, threads)
    trunk_session = ort_session(out_dir / EMBEDDING_ONNX, threads)
    step = chunk // 10
    starts = range(0, max(1, waveform.shape[1] - chunk + 1), step)
    chunks = torch.stack([torch.nn.functional.pad(waveform[:, s:s + chunk],
                                                  (0, max(0, chunk - waveform[:, s:s + chunk]
                                                          .shape[1]))) for s in starts])
    with torch.inference_mode():
        seg_ref = seg_model(chunks).numpy()
        fb = emb_model.compute_fbank(chunks)
        frames = emb_model.resnet.forward_frames(fb + 0)
        weights = torch.from_numpy(np.exp(seg_ref[:, :, :3]).transpose(0, 2, 1).copy())
        emb_ref = emb_model.resnet.forward_embedding(frames, weights=weights)[1]
        onnx_frames = OnnxForward(trunk_session, "fbank")(fb)
        emb_got = emb_model.resnet.forward_embedding(onnx_frames, weights=weights)[1]
    seg_got = OnnxForward(seg_session, "chunks")(chunks).numpy()

    def unit(e: Any) -> Any:
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # Powerset models give log-probabilities: compared as probabilities (what the argmax
    # and the masks see), where a score of -30 and -30.0001 are the same.
    powerset = bool(getattr(seg_model.specifications, "powerset", False))
    seg_diff = float(np.abs(np.exp(seg_ref) - np.exp(seg_got)).max() if powerset
                     else np.abs(seg_ref - seg_got).max())
    emb_diff = float((unit(emb_ref) - unit(emb_got)).abs().max())
    receipt["check"] = {"sample": "smoke/sample.wav", "chunks": len(starts),
                        "segmentation_max_abs_diff": seg_diff,
                        "embedding_max_abs_diff": emb_diff}
    # The whole pipeline: pytorch (pyannote's embeddings, exactly) against onnx.
    use_fast_embeddings(reference, passes=CPU_PASSES)
    file = {"waveform": waveform, "sample_rate": rate, "uri": "sample"}
    want = _turns(reference(dict(file)))
    with checking_receipt(release, receipt) as staged:
        use_onnx(candidate, staged, threads, CPU_PASSES)
        got = _turns(candidate(dict(file)))
    receipt["check"]["rttm"] = "identical" if got == want else "differs"
    receipt["check"]["segments"] = len(want)
    # No duration here: the receipt lands in an image's layer, which must be the same bytes
    # on every build (the installer says how long the export took).
    problems = []
    if seg_diff > TOLERANCE:
        problems.append(f"segmentation scores differ by {seg_diff:.2e}")
    if emb_diff > TOLERANCE:
        problems.append(f"embeddings differ by {emb_diff:.2e}")
    if got != want:
        problems.append("the sample's RTTM differs from PyTorch's")
    receipt["ok"] = not problems
    if problems:
        receipt["error"] = "; ".join(problems) + f" (tolerance {TOLERANCE})"
    return receipt


@contextmanager
def checking_receipt(release: Path, onnx: dict[str, Any]) -> Iterator[Path]:
    """``onnx`` marked ok for the check alone to read (use_onnx, as bin/diarize will), under a
    private name beside ``engines.json`` (the ONNX paths resolve against its folder), and
    removed after: what bin/diarize reads never says ok before the check has passed, even
    when the check raises or the process is killed during it."""
    path = release / f".{RECEIPT}.check.{os.getpid()}"
    try:
        write_receipt(path, dict(onnx, ok=True))
        yield path
    finally:
        path.unlink(missing_ok=True)


def _turns(output: Any) -> list[tuple[float, float, str]]:
    annotation = getattr(output, "speaker_diarization", output)
    return [(round(float(t.start), 3), round(float(t.end), 3), str(label))
            for t, _, label in annotation.itertracks(yield_label=True)]


def write_receipt(path: Path, onnx: dict[str, Any]) -> None:
    """``engines.json`` (or the check's private copy): ``{"onnx": onnx}``, atomically,
    readable by every user of the prefix."""
    write_atomic(path, json.dumps({"onnx": onnx}, indent=1) + "\n", mode=0o644)


# Written before the export starts, replaced by its outcome: an export killed on the way (a
# timeout, out of memory) leaves a receipt that says it did not finish, never an ok.
UNFINISHED = {"ok": False, "error": "the export or its check did not finish"}


def main(argv: list[str] | None = None,
         run_export: Callable[[Path, int | None], dict[str, Any]] = export) -> int:
    """``export.py RELEASE``: export and check (``run_export``), write
    ``RELEASE/engines.json`` once the check is over, print it; exit 0 when the onnx engine
    may be used, 1 when not (the receipt says why)."""
    go_offline()
    parser = argparse.ArgumentParser(prog="export.py")
    parser.add_argument("release", type=Path)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    write_receipt(args.release / RECEIPT, dict(UNFINISHED))
    try:
        onnx = run_export(args.release.resolve(), args.threads)
    except Exception as exc:  # noqa: BLE001 - any failure: the install goes on with pytorch
        first = (str(exc).splitlines() or [""])[0]
        onnx = {"ok": False, "error": f"{type(exc).__name__}: {first}"[:500]}
    write_receipt(args.release / RECEIPT, onnx)
    print(json.dumps({"onnx": onnx}), flush=True)
    return 0 if onnx.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
