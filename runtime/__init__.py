"""Runtime: open any model or artifact as a Backend.

What a path is decides the backend: a folder with a pocketvlm.json manifest is an artifact of that manifest's
format (verified against it first); a Hugging Face SmolVLM folder or Hub id runs on the reference backend.
Backends are imported only when used, so opening a GGUF artifact never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pocketvlm.errors import ArtifactError
from pocketvlm.manifest import read_manifest, verify
from pocketvlm.models import check_smolvlm_dir, resolve_source

from .base import Backend, Result, Step, Timings  # noqa: F401  (the public interface)

# format in pocketvlm.json -> "module:class"; each export path adds its runtime here.
BACKENDS = {
    "hf": "pocketvlm.runtime.reference:ReferenceBackend",
    "coreml": "pocketvlm.runtime.coreml:CoreMLBackend",
    "gguf": "pocketvlm.runtime.gguf:GGUFBackend",
    "mlx": "pocketvlm.runtime.mlx:MLXBackend",
    "onnx": "pocketvlm.runtime.onnx:ONNXBackend",
}


def keep_torch_out() -> None:
    """Make this process torch-free from here on, unless torch is already loaded.

    Engines like mlx-vlm import transformers, which imports torch whenever it is installed (~300 MB of RSS and a
    second of start-up that an on-device runtime never uses). A None entry in sys.modules makes transformers see
    torch as absent. Only entry points that will not need the reference backend later call this (ask, serve, the
    bench worker), never library code.
    """
    sys.modules.setdefault("torch", None)


def open_backend(model: str | Path, *, torch_free: bool = False, **options) -> Backend:
    """Load MODEL (artifact folder, Hugging Face folder, or Hub id) on the backend its format needs.

    torch_free: for a non-reference format, keep torch out of this process (see keep_torch_out)."""
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
    if torch_free and fmt != "hf":
        keep_torch_out()
    module_name, cls_name = BACKENDS[fmt].split(":")
    backend_cls = getattr(importlib.import_module(module_name), cls_name)
    return backend_cls(path, **options)
