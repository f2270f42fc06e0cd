"""MLX export (mlx-vlm): a SmolVLM2 checkpoint -> a normal mlx-vlm model folder (+ pocketvlm.json).

The folder loads with plain `mlx_vlm.load`. Traps handled here, all found by trying (mlx-vlm 0.7.10, mlx 0.32.4):
a missing text_config.rope_theta silently becomes 1e6; a group size that does not divide a layer leaves it silently
unquantized (checked before, verified after: quantize/mlx.py); tied embeddings do not convert (refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketvlm.artifact import set_image_size, source_record
from pocketvlm.errors import PocketVLMError
from pocketvlm.formats.mlx import BITS, DTYPES
from pocketvlm.manifest import atomic_output
from pocketvlm.models import ModelSource
from pocketvlm.quantize import mlx as qmlx


def export(source: ModelSource, out: Path, quant: str, *, force: bool = False, progress: bool = True,
           image_size: int | None = None, group_size: int | None = None, keep_vision: str | None = None) -> Path:
    config = json.loads((source.path / "config.json").read_text())
    if config.get("tie_word_embeddings") or config.get("text_config", {}).get("tie_word_embeddings"):
        raise PocketVLMError(f"{source.id}: tied word embeddings do not convert with mlx-vlm (it needs a separate "
                             f"lm_head); SmolVLM2 checkpoints are untied")
    quant_plan = None
    if quant in BITS:
        quant_plan = qmlx.plan(config, quant, group_size, keep_vision)
    elif group_size is not None or keep_vision is not None:
        raise PocketVLMError(f"--group-size and --keep-vision apply to 8bit/4bit exports, not {quant}")
    with atomic_output(out, force=force) as scratch:
        work = scratch / "model"  # mlx-vlm writes its own folder; keep our scratch root for the manifest
        qmlx.convert(source.path, work, dtype=DTYPES.get(quant, "float16"), quant_plan=quant_plan,
                     progress=progress)
        for f in work.iterdir():
            f.rename(scratch / f.name)
        work.rmdir()
        (scratch / "pocketvlm.json").unlink(missing_ok=True)  # the source's own manifest, copied along
        (scratch / "README.md").unlink(missing_ok=True)  # mlx-vlm's model card names a Hub repo we did not make
        budget = set_image_size(scratch, image_size)  # mlx-vlm copied the source's processor files as they are
        qmlx.finish(scratch, quant, quant_plan, source=source_record(source), keep_vision=keep_vision, **budget)
    return out
