"""What every artifact carries besides its engine's files, whatever the format: the processor files a Processor
reads, the record of where it came from, and the tool versions. Used by every export and quantize stage."""

from __future__ import annotations

import json
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


def set_image_size(folder: Path, image_size: int | None) -> dict:
    """Write the image budget (the longest edge images and video frames are resized to before tiling) into the
    artifact's preprocessor_config.json, where every consumer reads it -- our backends, mlx-vlm's load,
    transformers.js -- so all of them tile the same way. Returns the manifest's record of it ({} if unchanged)."""
    if image_size is None:
        return {}
    from .prompt import check_image_size

    check_image_size(image_size)
    # the image processor's settings live in preprocessor_config.json and, in folders a transformers 5 processor
    # saved (mlx-vlm's converter does), again inside processor_config.json -- which AutoProcessor then prefers
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        config = data.get(key) if key else data
        if not isinstance(config, dict):
            continue
        config["size"] = {**(config.get("size") or {}), "longest_edge": image_size}
        sampling = config.get("video_sampling")
        if isinstance(sampling, dict):  # transformers' video processor sizes frames by `size` too; keep in step
            sampling["video_size"] = {**(sampling.get("video_size") or {}), "longest_edge": image_size}
        path.write_text(json.dumps(data, indent=2) + "\n")
    return {"image_size": image_size}


def inherited(manifest: dict) -> dict:
    """What a quantized artifact keeps from the one it was made from (its processor files come along as they are)."""
    return {"image_size": manifest["image_size"]} if isinstance(manifest.get("image_size"), int) else {}
