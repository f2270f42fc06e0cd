"""What every artifact carries besides its engine's files, whatever the format: the processor files a Processor
reads, the record of where it came from, and the tool versions. Used by every export and quantize stage."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import __version__
from .manifest import sha256_file
from .models import ModelSource

# Everything a Processor (pocketvlm.prompt) reads, carried into artifacts that keep the Hugging Face layout.
PROCESSOR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "special_tokens_map.json")


def source_record(src: ModelSource) -> dict:
    """What the manifest says about where an artifact came from: enough to find the reference again."""
    weights = next((src.path / w for w in ("model.safetensors", "model.safetensors.index.json")
                    if (src.path / w).is_file()), None)
    return {"id": src.id, "revision": src.revision, "path": str(src.path),
            "sha256": sha256_file(weights) if weights else None}


def copy_processor_files(src: Path, dst: Path) -> None:
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def base_tools() -> dict:
    return {"pocketvlm": __version__}


def note(progress: bool, message: str) -> None:
    """A progress line of a long export or quantize step (silent with --quiet)."""
    if progress:
        print(f"pocketvlm: {message}", file=sys.stderr, flush=True)
