"""Quantize: an exported artifact -> a lower-bit artifact of the same format (quantize/<format>.py), and
fidelity.py, which measures any artifact against the PyTorch reference.

Each format module provides
    QUANTS: tuple[str, ...]   the target quant names it accepts
    quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path
and writes through pocketvlm.manifest.atomic_output, the manifest last.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.manifest import read_manifest, verify

QUANTIZERS = {
    "coreml": ("pocketvlm.quantize.coreml", "coreml"),
    "gguf": ("pocketvlm.quantize.gguf", "gguf"),
    "mlx": ("pocketvlm.quantize.mlx", "mlx"),
    "onnx": ("pocketvlm.quantize.onnx", "onnx"),
}


def quantize_artifact(artifact: Path, quant: str, out: Path, *, force: bool = False, progress: bool = True) -> Path:
    artifact = Path(artifact)
    manifest = read_manifest(artifact) if artifact.is_dir() else None
    if manifest is None:
        raise ArtifactError(f"{artifact}: not a pocketvlm artifact (no pocketvlm.json); export one first")
    fmt = manifest["format"]
    if fmt not in QUANTIZERS:
        raise PocketVLMError(f"{artifact}: quantizing {fmt} artifacts is not supported; re-export with --quant")
    module_name, extra = QUANTIZERS[fmt]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("pocketvlm"):
            raise
        raise PocketVLMError(f"quantizing {fmt} needs {e.name!r}: pip install 'pocketvlm[{extra}]'") from None
    if quant not in module.QUANTS:
        raise PocketVLMError(f"unknown --quant {quant!r} for {fmt}; choose one of: {', '.join(module.QUANTS)}")
    verify(artifact, manifest)
    return module.quantize(artifact, manifest, Path(out), quant, force=force, progress=progress)
