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
                 image_size: int | None = None, **options) -> Backend:
    """Load MODEL (artifact folder, Hugging Face folder, or Hub id) on the backend its format needs.

    torch_free: for a non-reference format, keep torch out of this process (see keep_torch_out).
    image_size: the image budget (longest edge before tiling) instead of the artifact's own."""
    check_threads(threads)
    if image_size is not None:
        check_image_size(image_size)
    path = Path(model).expanduser()
    if path.is_dir() and (manifest := read_manifest(path)) is not None:
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
