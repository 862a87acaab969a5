"""pyannote-bundle: air-gapped bundles for pyannote.audio speaker diarization."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyannote-bundle")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
