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


# mlx-vlm's module paths for SmolVLM (its Idefics3 sanitize: model.text_model -> language_model, ...)
ADAPTER_PREFIXES = (("model.text_model.", "language_model."), ("model.vision_model.", "vision_model."),
                    ("model.connector.", "connector."), ("lm_head", "language_model.lm_head"))


def mlx_module(peft_module: str) -> str:
    for prefix, replacement in ADAPTER_PREFIXES:
        if peft_module.startswith(prefix):
            return replacement + peft_module[len(prefix):]
    raise PocketVLMError(f"the adapter adapts {peft_module}, which mlx-vlm's SmolVLM has no name for")


def export_adapter(adapter, base: Path, out: Path, *, force: bool, progress: bool) -> Path:
    """A peft LoRA adapter -> mlx-vlm's own adapter folder (adapters.safetensors + adapter_config.json, what
    mlx_vlm.load(path, adapter_path=...) and `ask BASE --adapter OUT` apply): peft's lora_A [r, in] and lora_B
    [out, r] become mlx-vlm's lora_a [in, r] and lora_b [r, out], scale alpha / r, under mlx-vlm's module names.
    Text, head, vision and connector adapters all apply (mlx-vlm wraps those layers, quantized or not)."""
    import mlx.core as mx
    import mlx_vlm
    from safetensors.numpy import load_file

    from pocketvlm.adapters import WEIGHTS, adapter_record
    from pocketvlm.artifact import base_tools
    from pocketvlm.manifest import write_manifest

    tensors = load_file(str(adapter.path / WEIGHTS))
    keys = [mlx_module(m) for m in adapter.modules]
    with atomic_output(out, force=force) as scratch:
        weights = {}
        for module, key in zip(adapter.modules, keys):
            weights[f"{key}.lora_a"] = mx.array(tensors[f"base_model.model.{module}.lora_A.weight"].T.astype("float32"))
            weights[f"{key}.lora_b"] = mx.array(tensors[f"base_model.model.{module}.lora_B.weight"].T.astype("float32"))
        mx.save_safetensors(str(scratch / "adapters.safetensors"), weights)
        config = {"fine_tune_type": "lora", "num_layers": -1,
                  "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale,
                                      "dropout": float(adapter.config.get("lora_dropout") or 0.0), "keys": keys}}
        (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(scratch, format="mlx", quant="fp32", source={"id": str(adapter.path), "revision": None,
                                                                    "path": str(adapter.path)},
                       tools={**base_tools(), "mlx": mx.__version__, "mlx-vlm": mlx_vlm.__version__},
                       adapter={**adapter_record(adapter, "mlx"), "file": "adapters.safetensors"})
    if progress:
        import sys

        print(f"adapter: {len(keys)} modules, rank {adapter.rank}, scale {adapter.scale:g}", file=sys.stderr)
    return out
