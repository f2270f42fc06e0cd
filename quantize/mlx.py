"""MLX quantization: which layers get quantized at a group size, checked before and verified after conversion.

MLX quantizes a linear (or embedding) layer only when the group size divides its input dimension; mlx-vlm skips
any other layer *silently* (at hidden 576, group 128 quantizes almost nothing). So the plan is computed from the
checkpoint's config first: a language-model layer the group size does not divide is an error; a vision layer is
kept in float and reported. After conversion every planned layer must have its scales.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pocketvlm.artifact import base_tools, inherited
from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.formats.mlx import BITS, DEFAULT_GROUP_SIZE, DTYPES, GROUP_SIZES
from pocketvlm.manifest import atomic_output, write_manifest

# mlx-vlm's module paths (after its sanitize) for the parts of SmolVLM
VISION_PREFIXES = ("vision_model.", "connector.")


@dataclass
class QuantPlan:
    bits: int
    group_size: int
    keep_vision: str | None           # float dtype the vision tower stays in, or None to quantize it
    skipped: dict[str, str] = field(default_factory=dict)  # layer kind -> why it stays float

    def quantize_layer(self, path: str, input_dim: int) -> bool:
        if path.startswith(VISION_PREFIXES) and self.keep_vision:
            return False
        return input_dim % self.group_size == 0


def plan(config: dict, quant: str, group_size: int | None, keep_vision: str | None) -> QuantPlan:
    """Check the group size against every quantizable dimension of a SmolVLM config."""
    group_size = group_size or DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise PocketVLMError(f"--group-size {group_size} is not supported by MLX; choose 32, 64 or 128")
    text, vision = config["text_config"], config["vision_config"]
    lm_dims = {"hidden_size (attention, gate/up projections, embeddings, lm_head)": text["hidden_size"],
               "intermediate_size (down projections)": text["intermediate_size"]}
    bad = {name: dim for name, dim in lm_dims.items() if dim % group_size}
    if bad:
        fits = [g for g in GROUP_SIZES if all(d % g == 0 for d in lm_dims.values())]
        hint = f"use --group-size {' or '.join(map(str, fits))}" if fits else "no MLX group size fits this model"
        detail = ", ".join(f"{name} = {dim}" for name, dim in bad.items())
        raise PocketVLMError(f"group size {group_size} does not divide the language model's {detail}; "
                             f"those layers would stay unquantized; {hint}")
    p = QuantPlan(bits=BITS[quant], group_size=group_size, keep_vision=keep_vision)
    if not keep_vision:
        scale = config.get("scale_factor", 1)
        vision_dims = {"vision attention / fc1 (hidden_size)": vision["hidden_size"],
                       "vision fc2 (intermediate_size)": vision["intermediate_size"],
                       "connector (hidden_size x scale_factor^2)": vision["hidden_size"] * scale * scale}
        for name, dim in vision_dims.items():
            if dim % group_size:
                p.skipped[name] = f"{dim} is not a multiple of {group_size}: kept in float"
    return p


def predicate(p: QuantPlan):
    """The per-layer predicate mlx-vlm's convert takes (it replaces mlx-vlm's own, which skips all vision)."""
    def decide(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return p.quantize_layer(path, module.weight.shape[-1])
    return decide


def expected_quantized(weights: dict, p: QuantPlan) -> list[str]:
    """Layers (by weight name prefix) that must carry scales under the plan."""
    layers = []
    for name, array in weights.items():
        if not name.endswith(".weight") or array.ndim != 2 or name.endswith("patch_embedding.weight"):
            continue
        path = name[: -len(".weight")]
        input_dim = array.shape[-1]
        if f"{path}.scales" in weights:  # already packed: the stored width is not the input dim
            layers.append(path)
        elif p.quantize_layer(path, input_dim):
            layers.append(path)
    return layers


def verify_quantized(folder: Path, p: QuantPlan) -> dict:
    """After conversion: every planned layer has scales; returns counts for the manifest."""
    import mlx.core as mx

    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    planned = expected_quantized(weights, p)
    missing = [path for path in planned if f"{path}.scales" not in weights]
    if missing:
        raise ArtifactError(f"{len(missing)} layers that should be quantized have no scales "
                            f"(first: {missing[0]}); mlx-vlm skipped them")
    quantized = {n[: -len(".scales")] for n in weights if n.endswith(".scales")}
    vision_q = sum(1 for n in quantized if n.startswith(VISION_PREFIXES))
    return {"bits": p.bits, "group_size": p.group_size, "quantized_layers": len(quantized),
            "quantized_vision_layers": vision_q, "vision": vision_summary(p, vision_q),
            "kept_float": p.skipped}


def vision_summary(p: QuantPlan, quantized_vision_layers: int) -> str:
    """What the vision tower is, in one phrase for the manifest, describe() and check: "4bit g64", "8bit g32
    (some layers float)", "fp16 (--keep-vision)"."""
    if p.keep_vision:
        return f"{p.keep_vision} (--keep-vision)"
    if not quantized_vision_layers:
        return "float (the group size divides none of its layers)"
    return f"{p.bits}bit g{p.group_size}" + (" (some layers float: see kept_float)" if p.skipped else "")


def convert(hf_path: Path, out: Path, *, dtype: str, quant_plan: QuantPlan | None, progress: bool) -> str:
    """mlx-vlm's converter, its chatter captured (returned) unless progress is on."""
    from mlx_vlm import convert as mlx_convert

    kwargs = dict(hf_path=str(hf_path), mlx_path=str(out), dtype=dtype)
    if quant_plan:
        kwargs.update(quantize=True, q_bits=quant_plan.bits, q_group_size=quant_plan.group_size,
                      quant_predicate=predicate(quant_plan))
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter if not progress else _stderr()):
        mlx_convert(**kwargs)
    return chatter.getvalue()


def _stderr():
    import sys

    return sys.stderr


def fix_config(folder: Path) -> None:
    """mlx-vlm reads text_config.rope_theta and silently uses 1e6 without it; transformers 5 may only write
    rope_parameters. Make the value explicit."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", {})
    if "rope_theta" not in text:
        theta = (text.get("rope_parameters") or {}).get("rope_theta")
        if theta is None:
            raise ArtifactError(f"{path}: no rope_theta in text_config; cannot build a faithful MLX model")
        text["rope_theta"] = theta
        path.write_text(json.dumps(config, indent=2) + "\n")


def finish(folder: Path, quant: str, quant_plan, *, source: dict, keep_vision: str | None = None, **extra) -> None:
    """Shared last steps of export and quantize: config fix, quantization check, manifest."""
    import sys

    import mlx.core as mx
    import mlx_vlm

    fix_config(folder)
    info = verify_quantized(folder, quant_plan) if quant_plan else {"vision": keep_vision or DTYPES[quant]}
    for kind, why in info.get("kept_float", {}).items():
        print(f"pocketvlm: note: {kind}: {why}", file=sys.stderr)
    write_manifest(folder, format="mlx", quant=quant, source=source,
                   tools={**base_tools(), "mlx": mx.__version__, "mlx-vlm": mlx_vlm.__version__},
                   quantization=info, **extra)


def quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path:
    """8bit/4bit from an unquantized MLX artifact (same converter, the artifact as its input)."""
    config = json.loads((Path(artifact) / "config.json").read_text())
    quant_plan = plan(config, quant, None, None)
    with atomic_output(out, force=force) as scratch:
        work = scratch / "model"
        convert(artifact, work, dtype="float16", quant_plan=quant_plan, progress=progress)
        for f in work.iterdir():
            shutil.move(str(f), scratch / f.name)
        work.rmdir()
        (scratch / "pocketvlm.json").unlink(missing_ok=True)  # copied from the input by the converter
        finish(scratch, quant, quant_plan, source=manifest["source"],
               derived_from={"path": str(artifact), "quant": manifest["quant"]}, **inherited(manifest))
    return out
