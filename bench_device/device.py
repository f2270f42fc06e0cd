"""What machine a bench ran on, and its memory bandwidth (the ceiling of decode speed)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata

ENGINES = ("pocketvlm", "torch", "transformers", "llama-cpp-python", "mlx", "mlx-vlm", "onnxruntime", "coremltools",
           "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _accelerator() -> str:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "Apple GPU / Neural Engine (Metal, Core ML)"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip()
            if out:
                return out.splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "none (CPU only)"


def engine_versions() -> dict:
    versions = {}
    for name in ENGINES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Sustained copy bandwidth (read + write) of a buffer far larger than any cache, best of `repeats`."""
    import numpy as np

    src = np.ones(megabytes << 17, dtype=np.float64)  # megabytes * 2**20 / 8 elements
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def describe_device(label: str | None = None, bandwidth: bool = True) -> dict:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "accelerator": _accelerator(),
        "engines": engine_versions(),
        "memory_bandwidth_gbs": round(memory_bandwidth_gbs(), 2) if bandwidth else None,
    }
    info["id"] = label or f"{platform.node() or 'device'}-" + hashlib.sha256(
        f"{info['cpu']}{info['ram_bytes']}{info['os']}".encode()).hexdigest()[:6]
    return info
