"""Quantize: an exported artifact -> a lower-bit artifact of the same format (quantize/<format>.py), and
fidelity.py, which measures any artifact against the PyTorch reference.

Each format module provides
    quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path
and writes through pocketvlm.manifest.atomic_output, the manifest last. Which quants it makes, and from which, is
declared in the format registry (pocketvlm.formats).
"""

from __future__ import annotations

from pathlib import Path

from pocketvlm import formats
from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.manifest import check_output, read_manifest, verify


def quantize_artifact(artifact: Path, quant: str, out: Path, *, force: bool = False, progress: bool = True) -> Path:
    artifact = Path(artifact)
    manifest = read_manifest(artifact) if artifact.is_dir() else None
    if manifest is None:
        raise ArtifactError(f"{artifact}: not a pocketvlm artifact (no pocketvlm.json); export one first")
    name = manifest.get("format")
    descriptor = formats.FORMATS.get(name)
    if descriptor is None or not descriptor.quantize_quants:
        raise PocketVLMError(f"{artifact}: quantizing {name} artifacts is not supported; re-export with --quant")
    descriptor.check_quant(quant, quantize=True)
    if manifest.get("quant") not in descriptor.quantize_from:
        raise PocketVLMError(f"{artifact} is {manifest.get('quant')}; quantize from an "
                             f"{' or '.join(descriptor.quantize_from)} {name} export (pocketvlm export SOURCE --to "
                             f"{name} --quant {descriptor.quantize_from[0]}), or export {quant} directly")
    module = descriptor.stage("quantize")
    check_output(Path(out), force=force, protect=(artifact,))  # never the artifact being quantized
    verify(artifact, manifest)
    return module.quantize(artifact, manifest, Path(out), quant, force=force, progress=progress)
