"""Runtime: open any model or artifact as a Backend.

What a path is decides the backend: a folder with a pocketvlm.json manifest is an artifact of that manifest's
format (verified against it first); a Hugging Face SmolVLM folder or Hub id runs on the reference backend. The
format registry (pocketvlm.formats) names each format's backend; backends are imported only when used, so opening
a GGUF artifact never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pocketvlm import formats
from pocketvlm.errors import ArtifactError
from pocketvlm.threads import check_threads
from pocketvlm.manifest import read_manifest, verify
from pocketvlm.models import check_smolvlm_dir, resolve_source
from pocketvlm.paths import user_path
from pocketvlm.prompt import check_image_size

from .base import Backend, Prefilled, Result, Step, Timings  # noqa: F401  (the public interface)


def keep_torch_out() -> None:
    """Make this process torch-free from here on, unless torch is already loaded.

    Engines like mlx-vlm import transformers, which imports torch whenever it is installed (~300 MB of RSS and a
    second of start-up that an on-device runtime never uses). A None entry in sys.modules makes transformers see
    torch as absent. Only entry points that will not need the reference backend later call this (ask, serve, the
    bench worker), never library code.
    """
    sys.modules.setdefault("torch", None)


def open_backend(model: str | Path, *, torch_free: bool = False, threads: int | None = None,
                 image_size: int | None = None, adapter: str | Path | None = None, **options) -> Backend:
    """Load MODEL (artifact folder, Hugging Face folder, or Hub id) on the backend its format needs.

    torch_free: for a non-reference format, keep torch out of this process (see keep_torch_out).
    image_size: the image budget (longest edge before tiling) instead of the artifact's own.
    adapter: a LoRA adapter artifact (pocketvlm export ADAPTER --to FORMAT) to apply, for formats that do."""
    from pocketvlm.adapters import check_pair, refuse_adapter_as_model

    check_threads(threads)
    if image_size is not None:
        check_image_size(image_size)
    path = user_path(model)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        refuse_adapter_as_model(path, manifest)
    if adapter is not None:
        adapter = user_path(adapter)
        if not adapter.is_dir():
            raise ArtifactError(f"--adapter {adapter}: no such folder (an adapter artifact is the folder "
                                f"`pocketvlm export FINETUNED/adapter --to FORMAT --out DIR` writes)")
        adapter_manifest = read_manifest(adapter)
        applying = [name for name, f in formats.FORMATS.items() if f.adapters]
        if manifest is None or manifest.get("format") not in applying:
            raise ArtifactError(f"--adapter needs a {' or '.join(applying)} base artifact ({path} is "
                                f"{'a ' + str(manifest.get('format')) + ' artifact' if manifest else 'not one'}); "
                                f"for the others, use the merged model")
        check_pair(path, manifest, adapter, adapter_manifest)
        verify(adapter, adapter_manifest)
        options["adapter"] = adapter
    if manifest is not None:
        name = manifest.get("format")
        if name not in formats.FORMATS:
            raise ArtifactError(f"{path}: {name!r} artifacts are not supported by this pocketvlm "
                                f"(supported: {', '.join(sorted(formats.FORMATS))})")
        verify(path, manifest)
        if name == "hf":
            check_smolvlm_dir(path)
    else:
        name = "hf"
        path = resolve_source(str(model)).path
    fmt = formats.get(name)
    if torch_free and name != "hf":
        keep_torch_out()
    return fmt.backend_class()(path, threads=threads, image_size=image_size, **options)
