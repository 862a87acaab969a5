"""Where the models run: ``--device auto`` picks a GPU torch can use with this driver, else
the CPU; an explicit ``cuda[:N]`` that cannot be used is one line and EXIT_CANNOT_RUN.

Standard library only at import (torch is passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .exits import EXIT_CANNOT_RUN, RunError


def cuda_driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, or None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def driver_too_old(driver: tuple[int, int] | None, built_for: str | None) -> bool:
    """True when the driver cannot run a torch built for CUDA ``built_for`` ("12.8").

    CUDA's minor-version compatibility lets a driver of the same major version run it."""
    if driver is None or not built_for:
        return False
    try:
        major = int(built_for.split(".")[0])
    except ValueError:
        return False
    return driver[0] < major


def choose_device(requested: str, torch: Any, warn: Callable[[str], None]) -> str:
    """``auto`` -> ``cuda`` when torch can use a GPU (and the driver is new enough), else
    ``cpu``. An explicit ``cuda[:N]`` (its form checked by ``check_args``) that cannot be
    used is an error."""
    if requested == "cpu":
        return "cpu"
    built = getattr(torch.version, "cuda", None)
    driver = cuda_driver_version() if built else None
    too_old = driver_too_old(driver, built)
    if requested == "auto":
        if too_old and driver is not None:
            warn(f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}; this torch was "
                 f"built for CUDA {built}: using the CPU (update the driver to use the GPU)")
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not built:
        raise RunError(f"--device {requested}: this bundle's torch is a CPU-only build",
                           EXIT_CANNOT_RUN)
    if too_old and driver is not None:
        raise RunError(f"--device {requested}: the NVIDIA driver supports CUDA "
                           f"{driver[0]}.{driver[1]}, this torch needs CUDA {built}: update "
                           "the driver or use --device cpu", EXIT_CANNOT_RUN)
    if not torch.cuda.is_available():
        raise RunError(f"--device {requested}: torch sees no usable GPU (driver "
                           f"{'absent' if driver is None else f'{driver[0]}.{driver[1]}'})",
                           EXIT_CANNOT_RUN)
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RunError(f"--device {requested}: this host has "
                           f"{torch.cuda.device_count()} GPU(s)", EXIT_CANNOT_RUN)
    return requested
