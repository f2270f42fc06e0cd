"""MLX export (mlx-vlm): a SmolVLM2 checkpoint -> a normal mlx-vlm model folder (+ pocketvlm.json).

The folder loads with plain `mlx_vlm.load`. Traps handled here, all found by trying (mlx-vlm 0.7.10, mlx 0.32.4):
a missing text_config.rope_theta silently becomes 1e6; a group size that does not divide a layer leaves it silently
unquantized (checked before, verified after: quantize/mlx.py); tied embeddings do not convert (refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketvlm.errors import PocketVLMError
from pocketvlm.manifest import atomic_output, write_manifest
from pocketvlm.models import ModelSource

from pocketvlm.export import base_tools, source_record
from pocketvlm.quantize import mlx as qmlx

QUANTS = ("fp16", "fp32", "bf16", "8bit", "4bit")
OPTIONS = {
    "group_size": "quantization group size (32, 64, 128)",
    "keep_vision": "keep the vision tower unquantized (fp16) in 8bit/4bit exports",
}
DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}


def export(source: ModelSource, out: Path, quant: str, *, force: bool = False, progress: bool = True,
           group_size: int | None = None, keep_vision: str | None = None) -> Path:
    config = json.loads((source.path / "config.json").read_text())
    if config.get("tie_word_embeddings") or config.get("text_config", {}).get("tie_word_embeddings"):
        raise PocketVLMError(f"{source.id}: tied word embeddings do not convert with mlx-vlm (it needs a separate "
                             f"lm_head); SmolVLM2 checkpoints are untied")
    quant_plan = None
    if quant in qmlx.QUANTS:
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
        finish(scratch, quant, quant_plan, source=source_record(source), keep_vision=keep_vision)
    return out


def finish(folder: Path, quant: str, quant_plan, *, source: dict, keep_vision: str | None = None, **extra) -> None:
    """Shared last steps of export and quantize: config fix, quantization check, manifest."""
    import sys

    import mlx.core as mx
    import mlx_vlm

    qmlx.fix_config(folder)
    info = qmlx.verify_quantized(folder, quant_plan) if quant_plan else {"vision": keep_vision or DTYPES[quant]}
    for kind, why in info.get("kept_float", {}).items():
        print(f"pocketvlm: note: {kind}: {why}", file=sys.stderr)
    write_manifest(folder, format="mlx", quant=quant, source=source,
                   tools={**base_tools(), "mlx": mx.__version__, "mlx-vlm": mlx_vlm.__version__},
                   quantization=info, **extra)
