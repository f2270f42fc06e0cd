"""Runtime: open any model or artifact as a Backend.

What a path is decides the backend: a folder with a pocketvlm.json manifest is an artifact of that manifest's
format (verified against it first); a Hugging Face SmolVLM folder or Hub id runs on the reference backend.
Backends are imported only when used, so opening a GGUF artifact never imports torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pocketvlm.errors import ArtifactError
from pocketvlm.manifest import read_manifest, verify
from pocketvlm.models import check_smolvlm_dir, resolve_source

from .base import Backend, Result, Step, Timings  # noqa: F401  (the public interface)

# format in pocketvlm.json -> "module:class"; each export path adds its runtime here.
BACKENDS = {
    "hf": "pocketvlm.runtime.reference:ReferenceBackend",
    "gguf": "pocketvlm.runtime.gguf:GGUFBackend",
    "mlx": "pocketvlm.runtime.mlx:MLXBackend",
    "onnx": "pocketvlm.runtime.onnx:ONNXBackend",
}


def open_backend(model: str | Path, **options) -> Backend:
    """Load MODEL (artifact folder, Hugging Face folder, or Hub id) on the backend its format needs."""
    path = Path(model).expanduser()
    if path.is_dir() and (manifest := read_manifest(path)) is not None:
        fmt = manifest.get("format")
        if fmt not in BACKENDS:
            raise ArtifactError(f"{path}: {fmt!r} artifacts are not supported by this pocketvlm "
                                f"(supported: {', '.join(sorted(BACKENDS))})")
        verify(path, manifest)
        if fmt == "hf":
            check_smolvlm_dir(path)
    else:
        fmt = "hf"
        path = resolve_source(str(model)).path
    module_name, cls_name = BACKENDS[fmt].split(":")
    backend_cls = getattr(importlib.import_module(module_name), cls_name)
    return backend_cls(path, **options)
