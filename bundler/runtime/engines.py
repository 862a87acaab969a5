"""How the pyannote pipeline computes: the engines behind ``--engine``.

``bin/diarize`` and ``bin/transcribe`` load pyannote's own pipeline; this module decides
what computes its two models, without changing what they compute:

* ``pyannote``: pyannote's own code, untouched (the reference).
* ``pytorch``: the fast path, pyannote's computation reorganised. pyannote runs the
  WeSpeaker ResNet (fbank and the whole convolutional trunk) once for every (chunk, local
  speaker) pair, on the same audio each time: only the statistics-pooling weights differ
  between the speakers of a chunk, and the model already pools several speakers at once.
  Here the trunk runs once per chunk and the frames are pooled per speaker with each
  speaker's mask, through the model's own ``forward_frames`` and ``forward_embedding``;
  chunks where no speaker is active skip the trunk (their embeddings are the model's
  embedding of an all-zero mask, computed by the model). Batching (``embedding_batch_size``
  chunks per trunk pass, pyannote's memory), ``embedding_exclude_overlap`` and the masks are
  pyannote's, line for line.
* ``onnx``: the same, with the ResNet trunk (after fbank) and the segmentation model run
  by onnxruntime from ONNX files that ``install.py`` exported from this install's
  checkpoints and checked against the ``pytorch`` engine on the smoke sample: segmentation
  scores and L2-normalised embeddings within TOLERANCE, the sample's RTTM identical
  (``engines.json`` in the release: what was exported, its sha256, and the check). CPU only.
* ``auto``: ``onnx`` on a CPU when the install's check passed, else ``pytorch``; on a GPU,
  ``pytorch`` (CUDA).

What is checked where: the install checks ``onnx`` against ``pytorch`` on the smoke sample,
nothing more; ``pytorch`` and ``onnx`` against ``pyannote`` (the same RTTM; embeddings
within 1e-6 for ``pytorch``, TOLERANCE for ``onnx``) only in the project's slow end-to-end
tests, on their recordings (``tests/e2e.py``, ``check_engines_match_pyannote``).

Anything not recognised (a pipeline class, a ``get_embeddings`` that is not one of the
pyannote.audio releases this was checked against, an embedding model that is not a
WeSpeaker ResNet) runs pyannote's own path and says why (``engine_note``).

Shipped verbatim in every bundle (``runtime/engines.py``). The installer's ONNX export,
which makes and checks the files the ``onnx`` engine reads, is ``runtime/export.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import sha256_file, usable_cores

ENGINES = ("auto", "pyannote", "pytorch", "onnx")
# Written by the installer beside runtime/: what was exported and how it compared.
RECEIPT = "engines.json"
ONNX_DIR = "onnx"
SEGMENTATION_ONNX = "segmentation.onnx"
EMBEDDING_ONNX = "embedding-trunk.onnx"
# On a CPU the fast engines run each model in passes of at most this many chunks, whatever
# pyannote's batch size. One 10-s chunk's activations in the ResNet trunk are about 10 MB a
# layer: 32 at once spill every cache. Measured on 2 cores (AMD EPYC, 2 MB L2), seconds per
# chunk: trunk 0.90 in one pass of 32 against 0.28 in passes of 2 (PyTorch), 0.32 against
# 0.21 (onnxruntime); segmentation 0.087 against 0.027 in passes of 8 (PyTorch). Each chunk
# is computed alone either way (measured: bit-identical outputs). On a GPU, one pass a batch.
CPU_PASSES = {"segmentation": 8, "embedding": 2}
# The ONNX outputs must match PyTorch's this closely (L2-normalised embeddings and
# segmentation scores) on the sample, or the engine is not used.
TOLERANCE = 1e-4
TOLERANCE_TEXT = f"{TOLERANCE:.0e}".replace("e-0", "e-")  # "1e-4", as the help and docs say
OPSET = 17

# The sha256 of the source of pyannote.audio's SpeakerDiarization.get_embeddings in the
# releases the fast path reproduces -> whether that release crops each chunk with
# ``duration=``. Another source (another release) runs pyannote's own path, until checked.
KNOWN_GET_EMBEDDINGS = {
    "010e2ef1528304cf1b2209d2e8185c36ae8eee75878c550ccdd1f9337fdd139d": True,  # 3.4.0
    "2c8c00b8b036488db70c9eb9cb55d1067f998339deefb659cf96680fc6ebe5f4": False,  # 4.0.7
}
CHECKED_RELEASES = "pyannote.audio 3.4.0 and 4.0.7"


class EngineUnavailable(Exception):
    """This engine cannot run this pipeline; the message says why (one line)."""


@dataclass
class Engine:
    """What ``apply`` made of ``--engine``: the engine that runs, and why not another."""

    requested: str
    name: str
    note: str | None = None
    threads: int | None = None
    passes: dict[str, int] | None = None
    onnx: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine": self.name, "engine_requested": self.requested,
                               "threads": self.threads}
        if self.passes:
            out["chunks_per_pass"] = dict(self.passes)
        if self.note:
            out["engine_note"] = self.note
        return out


# --- the threads every model gets (the cores: common.usable_cores) ----------------------------
# onnxruntime's idle workers sleep instead of spinning: the sessions and torch's pool take
# turns (segmentation, then the trunk, then torch's pooling), so a pool spinning while
# another works would take the cores that one needs (a 1-CPU quota would run 2-3 busy threads).
ORT_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}



def cpu_threads(requested: int | None = None) -> int:
    """The one number of CPU threads for every model a program runs: torch's intra-op pool,
    each onnxruntime session's and CTranslate2's ``cpu_threads``. ``requested`` (``--threads``,
    ``--asr-threads``) when given, else usable_cores(): torch's, onnxruntime's and
    CTranslate2's own defaults count the host's cores, not a cgroup quota."""
    return requested if requested else usable_cores()


# The pools native libraries start on their own when they load, sized by the host's cores
# (a quota ignored): OpenMP's (torch's, before set_num_threads) and numpy's BLAS (pyannote's
# clustering), whose idle workers spin. Read once, at load: set before torch or numpy is
# imported. A value the user set wins.
NATIVE_POOLS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_native_pools(threads: int, environ: Any = os.environ) -> None:
    """Size the native libraries' own pools (NATIVE_POOLS) to ``threads``, unless set."""
    for name in NATIVE_POOLS:
        environ.setdefault(name, str(threads))


def set_torch_threads(torch: Any, threads: int) -> None:
    """torch computes with ``threads`` intra-op threads and one inter-op thread (pyannote's
    inference forks no parallel work; the pool would only be more threads)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # settable once a process, before any inter-op work: already fixed
        pass


def ort_settings(threads: int) -> dict[str, Any]:
    """What every onnxruntime session of the engines is opened with, as data:
    ``SessionOptions`` attributes (``threads`` intra-op threads, one inter-op thread: the
    graphs run sequentially) and session config entries (ORT_CONFIG: no spinning).

    Each session keeps its own pool, not onnxruntime's global one: the two never run at
    once, their idle workers sleep, and the global pool needs a call into onnxruntime's
    private bindings before the first session of the process."""
    return {"options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1},
            "config": dict(ORT_CONFIG)}


# --- onnxruntime: loaded by the onnx engine alone ---------------------------------------------
@contextmanager
def onnxruntime_deferred() -> Iterator[None]:
    """Within the block ``import onnxruntime`` raises ImportError; after it, onnxruntime
    imports as usual (nothing changes where it is loaded already).

    pyannote.audio's pipelines import onnxruntime when they load (3.4.0 and 4.0.7,
    ``pipelines/speaker_verification.py``), only to know whether its ONNX WeSpeaker loader
    may run, which a bundle never uses (its embedding is a pyannote checkpoint, trap 1).
    Loading onnxruntime probes the CPU, and where that probe crashes the process dies of
    SIGSEGV whatever the engine (onnxruntime 1.28 on aarch64 under qemu-user 7.2, which
    shows the guest the host's x86 /proc/cpuinfo). The pytorch and pyannote engines need
    none of it."""
    if "onnxruntime" in sys.modules:
        yield
        return
    sys.modules["onnxruntime"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "onnxruntime" in sys.modules and sys.modules["onnxruntime"] is None:
            del sys.modules["onnxruntime"]


def onnxruntime_failure(receipt: Path | None) -> str | None:
    """Why onnxruntime cannot load on this host, as the install found when it imported it
    alone before the export (``onnxruntime_loads`` false in ``engines.json``), or None: it
    loads, or it was not tried."""
    try:
        onnx = json.loads(receipt.read_text()).get("onnx") if receipt else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(onnx, dict) and onnx.get("onnxruntime_loads") is False:
        return str(onnx.get("error") or "it does not load")
    return None


def load_pyannote() -> Any:
    """pyannote.audio's ``Pipeline``, its pipelines loaded without onnxruntime
    (onnxruntime_deferred): the onnx engine imports it when it opens its sessions."""
    with onnxruntime_deferred():
        import pyannote.audio.pipelines  # noqa: F401 - Pipeline.from_pretrained loads them
        from pyannote.audio import Pipeline
    return Pipeline


# --- recognising what the fast path reproduces ------------------------------------------------
def source_digest(function: Any) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def recognise(pipeline: Any) -> bool:
    """Whether this pipeline's embedding step is one the fast path reproduces; returns
    whether its chunks are cropped with ``duration=`` (3.x). EngineUnavailable if not."""
    from pyannote.audio import __version__ as version
    from pyannote.audio.models.embedding import wespeaker
    from pyannote.audio.models.embedding.wespeaker import BaseWeSpeakerResNet
    from pyannote.audio.models.embedding.wespeaker.resnet import TSTP, ResNet
    from pyannote.audio.pipelines import SpeakerDiarization
    from pyannote.audio.pipelines.speaker_verification import (
        PyannoteAudioPretrainedSpeakerEmbedding,
    )

    if type(pipeline) is not SpeakerDiarization:
        raise EngineUnavailable(f"the pipeline is {type(pipeline).__name__}, not "
                                "pyannote.audio's SpeakerDiarization")
    digest = source_digest(SpeakerDiarization.get_embeddings)
    crop_duration = KNOWN_GET_EMBEDDINGS.get(digest or "")
    if crop_duration is None:
        raise EngineUnavailable(f"pyannote.audio {version}'s SpeakerDiarization."
                                "get_embeddings is not one this engine reproduces (checked: "
                                f"{CHECKED_RELEASES})")
    embedding: Any = getattr(pipeline, "_embedding", None)
    if type(embedding) is not PyannoteAudioPretrainedSpeakerEmbedding:
        raise EngineUnavailable(f"the embedding is {type(embedding).__name__}, not a "
                                "pyannote.audio model")
    model = embedding.model_
    resnet: Any = getattr(model, "resnet", None)
    family = {cls for cls in vars(wespeaker).values()
              if isinstance(cls, type) and issubclass(cls, BaseWeSpeakerResNet)
              and cls is not BaseWeSpeakerResNet}
    if (type(model) not in family or model.fbank_only
            or type(model).forward is not BaseWeSpeakerResNet.forward
            or type(resnet) is not ResNet or type(resnet.pool) is not TSTP):
        raise EngineUnavailable(f"the embedding model is {type(model).__name__}, not a "
                                "WeSpeaker ResNet this engine reproduces")
    return crop_duration


# --- the exact fast path: the trunk once per chunk ----------------------------------------
class Trunk:
    """The WeSpeaker ResNet's convolutional trunk on fbank features (PyTorch)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, fbank: Any) -> Any:
        return self.model.resnet.forward_frames(fbank)


class InPasses:
    """``forward`` on a batch of chunks, at most ``size`` chunks a call (CPU_PASSES)."""

    def __init__(self, forward: Callable[[Any], Any], size: int,
                 join: Callable[[list[Any]], Any] | None = None) -> None:
        self.forward = forward
        self.size = size
        self.join = join  # torch.cat unless told

    def __call__(self, batch: Any) -> Any:
        if len(batch) <= self.size:
            return self.forward(batch)
        parts = [self.forward(batch[i:i + self.size]) for i in range(0, len(batch), self.size)]
        if self.join is not None:
            return self.join(parts)
        import torch

        return torch.cat(parts)


def fast_get_embeddings(self: Any, file: Any, binary_segmentations: Any,
                        exclude_overlap: bool = False, hook: Callable[..., Any] | None = None
                        ) -> Any:
    """SpeakerDiarization.get_embeddings, with the trunk once per chunk: the same
    (num_chunks, num_speakers, dimension) embeddings. The masks, the overlap rule and the
    minimum number of frames are pyannote's own, line for line."""
    import numpy as np
    import torch
    from pyannote.core import SlidingWindowFeature

    if self.training:  # hyper-parameter tuning caches embeddings: pyannote's own path
        base: Any = type(self).__mro__[1]
        return base.get_embeddings(self, file, binary_segmentations,
                                   exclude_overlap=exclude_overlap, hook=hook)
    duration = binary_segmentations.sliding_window.duration
    num_chunks, num_frames, num_speakers = binary_segmentations.data.shape
    if exclude_overlap:
        min_num_samples = self._embedding.min_num_samples
        num_samples = duration * self._embedding.sample_rate
        min_num_frames = math.ceil(num_frames * min_num_samples / num_samples)
        clean_frames = 1.0 * (np.sum(binary_segmentations.data, axis=2, keepdims=True) < 2)
        clean_segmentations = SlidingWindowFeature(
            binary_segmentations.data * clean_frames, binary_segmentations.sliding_window)
    else:
        min_num_frames = -1
        clean_segmentations = SlidingWindowFeature(
            binary_segmentations.data, binary_segmentations.sliding_window)
    crop_kwargs = {"duration": duration} if self._fast_crop_duration else {}
    embedding = self._embedding
    model = embedding.model_
    device = embedding.device
    trunk = self._fast_trunk

    def chunks() -> Iterator[tuple[Any, Any]]:
        for (chunk, masks), (_, clean_masks) in zip(binary_segmentations,
                                                   clean_segmentations):
            masks = np.nan_to_num(masks, nan=0.0).astype(np.float32)
            clean_masks = np.nan_to_num(clean_masks, nan=0.0).astype(np.float32)
            used = [clean if np.sum(clean) > min_num_frames else mask
                    for mask, clean in zip(masks.T, clean_masks.T)]
            weights = torch.from_numpy(np.stack(used))  # (num_speakers, num_frames)
            if not weights.any():
                yield None, weights  # no active speaker: no audio needed
                continue
            waveform, _ = self._audio.crop(file, chunk, mode="pad", **crop_kwargs)
            yield waveform[None], weights

    batch_size = max(1, int(self.embedding_batch_size))
    batch_count = math.ceil(num_chunks / batch_size)
    if hook is not None:
        hook("embeddings", None, total=batch_count, completed=0)
    out = np.empty((num_chunks, num_speakers, embedding.dimension), dtype=np.float32)
    zero: Any = None
    done = 0
    iterator = chunks()
    with torch.inference_mode(), warnings.catch_warnings():
        # 3.x warns on every call that the mask and the frames differ in length (pyannote
        # silences it the same way).
        warnings.simplefilter("ignore")
        for i in range(1, batch_count + 1):
            batch = [next(iterator) for _ in range(min(batch_size, num_chunks - done))]
            active = [n for n, (w, _) in enumerate(batch) if w is not None]
            if active:
                waveforms = torch.vstack([batch[n][0] for n in active]).to(device)
                weights = torch.stack([batch[n][1] for n in active]).to(device)
                frames = trunk(model.compute_fbank(waveforms))
                emb = model.resnet.forward_embedding(frames, weights=weights)[1]
                out[[done + n for n in active]] = emb.cpu().numpy()
            for n, (w, _weights) in enumerate(batch):
                if w is None:
                    if zero is None:
                        zero = _zero_mask_embedding(model, device, num_speakers, num_frames)
                    out[done + n] = zero
            done += len(batch)
            if hook is not None:
                hook("embeddings", out[done - len(batch):done], total=batch_count,
                     completed=i)
    return out


def _zero_mask_embedding(model: Any, device: Any, num_speakers: int, num_frames: int) -> Any:
    """The model's embedding for all-zero masks. Its statistics pooling weighs every frame
    by 0: the mean and standard deviation are exactly 0 whatever the (finite) frames are, so
    any frames of the trunk's shape give pyannote's value."""
    import torch

    waveform = torch.zeros(1, 1, model.hparams.sample_rate * 10, device=device)
    frames = model.resnet.forward_frames(model.compute_fbank(waveform))
    weights = torch.zeros(1, num_speakers, num_frames, device=device)
    return model.resnet.forward_embedding(torch.zeros_like(frames),
                                          weights=weights)[1][0].cpu().numpy()


def use_fast_embeddings(pipeline: Any, trunk: Callable[[Any], Any] | None = None,
                        segmentation: Callable[[Any], Any] | None = None,
                        passes: dict[str, int] | None = None) -> None:
    """Make ``pipeline`` compute embeddings with the trunk once per chunk: its class becomes
    a subclass of pyannote's own whose get_embeddings is ``fast_get_embeddings``. The
    segmentation model's forward pass becomes ``segmentation`` when given; with ``passes``
    (CPU_PASSES), each model runs that many chunks at a time. EngineUnavailable for a
    pipeline it does not recognise (nothing is changed)."""
    crop_duration = recognise(pipeline)
    seg_model = pipeline._segmentation.model
    try:
        check_segmentation_model(seg_model)  # a model proven to compute chunks alone
        pyannet = True
    except EngineUnavailable:
        if segmentation is not None:
            raise
        pyannet = False
    trunk = trunk or Trunk(pipeline._embedding.model_)
    if passes:
        trunk = InPasses(trunk, passes["embedding"])
        if pyannet:
            segmentation = InPasses(segmentation or seg_model, passes["segmentation"])
    base = type(pipeline)
    fast = type(f"Fast{base.__name__}", (base,), {"get_embeddings": fast_get_embeddings,
                                                  "__module__": __name__})
    object.__setattr__(pipeline, "_fast_crop_duration", crop_duration)
    object.__setattr__(pipeline, "_fast_trunk", trunk)
    pipeline.__class__ = fast
    if segmentation is not None:
        pipeline._segmentation.model = _SegmentationProxy(seg_model, segmentation)


def apply(pipeline: Any, requested: str, device: str, threads: int | None,
          receipt: Path | None) -> Engine:
    """Set ``pipeline`` up for ``requested`` (one of ENGINES) on ``device``; what runs."""
    import torch

    # Every engine, pyannote's own too: how many threads compute is not what they compute,
    # and torch's default would oversubscribe a container's CPU quota.
    count = cpu_threads(threads)
    engine = Engine(requested, "pyannote", threads=count)
    set_torch_threads(torch, count)
    if requested == "pyannote":
        return engine
    passes = dict(CPU_PASSES) if device == "cpu" else None
    notes = []
    if requested in ("auto", "onnx"):
        if device != "cpu":
            if requested == "onnx":
                raise EngineUnavailable(f"--engine onnx runs on the CPU, not {device}")
        else:
            try:
                engine.onnx = use_onnx(pipeline, receipt, count, passes)
                engine.name, engine.passes = "onnx", passes
                return engine
            except EngineUnavailable as exc:
                if requested == "onnx":
                    raise
                notes.append(f"onnx: {exc}")
    try:
        use_fast_embeddings(pipeline, passes=passes)
        engine.name, engine.passes = "pytorch", passes
    except EngineUnavailable as exc:
        notes.append(f"pytorch: {exc}")
        engine.name = "pyannote"
    engine.note = "; ".join(notes) or None
    return engine


# --- onnx ---------------------------------------------------------------------------------
def ort_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session, exact fp32, telemetry off, threads as ort_settings."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    try:
        ort.disable_telemetry_events()
    except AttributeError:
        pass
    options = ort.SessionOptions()
    settings = ort_settings(threads)
    for name, value in settings["options"].items():
        setattr(options, name, value)
    for key, value in settings["config"].items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


class OnnxForward:
    """An exported model's forward pass in onnxruntime, PyTorch tensors in and out: the
    trunk (``fbank`` in, frames out) or the segmentation model (``chunks`` in, scores out)."""

    def __init__(self, session: Any, input_name: str) -> None:
        self.session = session
        self.input_name = input_name

    def __call__(self, batch: Any) -> Any:
        import torch

        (out,) = self.session.run(None, {self.input_name: batch.contiguous().numpy()})
        return torch.from_numpy(out)


def read_receipt(receipt: Path | None) -> dict[str, Any]:
    if receipt is None or not receipt.is_file():
        raise EngineUnavailable("no ONNX export in this install (install.py makes it)")
    try:
        data = json.loads(receipt.read_text())
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(f"cannot read {receipt}: {exc}") from None
    onnx = data.get("onnx") if isinstance(data, dict) else None
    if isinstance(onnx, dict) and onnx.get("skipped"):
        raise EngineUnavailable(f"no ONNX export in this install ({onnx['skipped']})")
    if not isinstance(onnx, dict) or onnx.get("ok") is not True:
        why = onnx.get("error") if isinstance(onnx, dict) else None
        raise EngineUnavailable(f"the install's ONNX check did not pass{': ' + why if why else ''}")
    return onnx


def use_onnx(pipeline: Any, receipt: Path | None, threads: int,
             passes: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the trunk and the segmentation model in onnxruntime, from the files the
    installer exported and checked, each matched against its sha256 first; ``passes`` as
    for use_fast_embeddings."""
    onnx = read_receipt(receipt)
    assert receipt is not None
    files = {}
    for role in ("segmentation", "embedding"):
        entry = onnx.get(role) or {}
        path = receipt.parent / str(entry.get("path", ""))
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise EngineUnavailable(f"{path} is missing or differs from what the install "
                                    "checked")
        files[role] = path
    for role, key in (("segmentation", "segmentation_checkpoint"),
                      ("embedding", "embedding_checkpoint")):
        source = onnx.get(key) or {}
        src = Path(str(source.get("path", "")))
        if not src.is_file() or sha256_file(src) != source.get("sha256"):
            raise EngineUnavailable(f"the {role} checkpoint is not the one the ONNX file "
                                    "was exported from")
    seg_model = pipeline._segmentation.model
    check_segmentation_model(seg_model)
    recognise(pipeline)
    # Both sessions open before the pipeline is touched: a failure leaves it as it was.
    try:
        trunk = OnnxForward(ort_session(files["embedding"], threads), "fbank")
        segmentation = OnnxForward(ort_session(files["segmentation"], threads), "chunks")
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise EngineUnavailable(f"onnxruntime cannot load the exported files: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    use_fast_embeddings(pipeline, trunk, segmentation, passes)
    return {"segmentation": onnx["segmentation"], "embedding": onnx["embedding"]}


def check_segmentation_model(model: Any) -> None:
    from pyannote.audio.models.segmentation import PyanNet

    if type(model) is not PyanNet:
        raise EngineUnavailable(f"the segmentation model is {type(model).__name__}, not "
                                "PyanNet")


class _SegmentationProxy:
    """pyannote's segmentation model, with its forward pass in onnxruntime; everything else
    (specifications, receptive field, example output, device) is the model's own."""

    def __init__(self, model: Any, forward: Callable[[Any], Any]) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_forward", forward)

    def __call__(self, chunks: Any) -> Any:
        return self._forward(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)
