"""LoRA adapters in peft's own format (what `pocketvlm finetune` writes in OUT/adapter/): reading and checking one,
and what an adapter artifact's manifest says, for the formats that apply adapters at run time (GGUF, MLX).

One base on the device, many small adapters: `pocketvlm export OUT/adapter --to gguf|mlx` writes an adapter
artifact (its manifest has an "adapter" record), and `pocketvlm ask BASE_ARTIFACT --adapter ADAPTER_ARTIFACT` applies
it to a base exported from the same base model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError, PocketVLMError, SourceError, one_line
from .manifest import SHA256

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# peft's tensor names: base_model.model.<module>.lora_A.weight / .lora_B.weight
TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class PeftAdapter:
    path: Path
    rank: int
    alpha: float
    modules: list[str]                    # transformers module paths, e.g. model.text_model.layers.0.self_attn.q_proj
    base: str | None                      # base_model_name_or_path
    config: dict = field(repr=False, default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parts(self) -> set[str]:
        """Which parts of SmolVLM it adapts: text (language model), head (lm_head), vision, connector."""
        out = set()
        for m in self.modules:
            out.add("vision" if ".vision_model." in f".{m}" else "connector" if ".connector." in f".{m}"
                    else "head" if m.endswith("lm_head") else "text")
        return out


def is_peft_adapter(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "config.json").is_file()


def read_peft_adapter(path: Path) -> PeftAdapter:
    """peft's adapter folder, checked: a LoRA adapter (not DoRA / rsLoRA / per-layer ranks, which the formats'
    adapter loaders do not reproduce), with A/B pairs of the declared rank for every module."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path / CONFIG}: unreadable adapter config ({e.__class__.__name__})") from e
    if not isinstance(config, dict) or config.get("peft_type") not in (None, "LORA"):
        raise SourceError(f"{path}: a {config.get('peft_type') if isinstance(config, dict) else 'malformed'} "
                          f"adapter; only LoRA adapters export")
    for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")):
        if config.get(flag):
            raise SourceError(f"{path}: a {what} adapter; llama.cpp's and mlx-vlm's loaders apply plain LoRA only "
                              f"(merge it instead: pocketvlm finetune writes the merged model beside the adapter)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SourceError(f"{path}: per-layer ranks or alphas (rank_pattern/alpha_pattern) do not export; merge it")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise SourceError(f"{path / CONFIG}: no LoRA rank (r) / lora_alpha")
    if not (path / WEIGHTS).is_file():
        raise SourceError(f"{path}: no {WEIGHTS}")
    pairs: dict[str, set[str]] = {}
    try:
        with safe_open(str(path / WEIGHTS), "np") as f:
            for name in f.keys():
                m = TENSOR.match(name)
                if not m and name.endswith(".base_layer.weight"):
                    raise SourceError(f"{path / WEIGHTS}: holds {name}, a copy of the base's own layer (peft "
                                      f"saved the embedding or head layer with the adapter); re-save it with "
                                      f"save_pretrained(..., save_embedding_layers=False)")
                if not m:
                    raise SourceError(f"{path / WEIGHTS}: {name} is not a LoRA A/B weight; only LoRA adapters "
                                      f"export")
                shape = f.get_slice(name).get_shape()
                if (m["ab"] == "A" and shape[0] != rank) or (m["ab"] == "B" and shape[-1] != rank):
                    raise SourceError(f"{path / WEIGHTS}: {name} has shape {shape}, not rank {rank}")
                pairs.setdefault(m["module"], set()).add(m["ab"])
    except (OSError, ValueError, SafetensorError) as e:
        raise SourceError(f"{path / WEIGHTS}: unreadable ({e.__class__.__name__}: {one_line(e, 120)})") from e
    incomplete = sorted(m for m, ab in pairs.items() if ab != {"A", "B"})
    if incomplete or not pairs:
        raise SourceError(f"{path / WEIGHTS}: " + (f"{incomplete[0]} has only one of lora_A / lora_B"
                                                   if incomplete else "no LoRA weights"))
    base = config.get("base_model_name_or_path")
    return PeftAdapter(path, rank, float(alpha), sorted(pairs), base if isinstance(base, str) else None, config)


def adapter_base(adapter: PeftAdapter) -> Path:
    """The base model an adapter belongs with, for its config: the folder beside it (a `pocketvlm finetune`
    output holds the adapter in OUT/adapter/ next to OUT's config.json), else the base it names."""
    from .models import resolve_source

    beside = adapter.path.parent
    if (beside / "config.json").is_file():
        return beside
    if adapter.base:
        return resolve_source(adapter.base).path
    raise SourceError(f"{adapter.path}: cannot tell which base model it belongs to (no config.json beside it and no "
                      f"base_model_name_or_path)")


def named_base_paths(adapter: PeftAdapter) -> list[Path]:
    """The local folder of the base the adapter names (base_model_name_or_path), if it resolves here offline."""
    from .models import resolve_source

    if not adapter.base:
        return []
    try:
        return [resolve_source(adapter.base, local_only=True).path]
    except PocketVLMError:
        return []


def base_record(adapter: PeftAdapter) -> dict:
    """What the adapter artifact's manifest says about its base, to check it against a base artifact later: the
    base's weights hash as the fine-tune recorded it, else as the named base's weights hash now. An adapter whose
    base cannot be verified either way is refused: applied to another base it would answer nonsense, silently."""
    from .artifact import source_record
    from .manifest import read_manifest
    from .models import resolve_source

    beside = adapter.path.parent
    manifest = read_manifest(beside) if (beside / "pocketvlm.json").is_file() else None
    base = ((manifest or {}).get("finetune") or {}).get("base") or {}
    if not base.get("sha256") and named_base_paths(adapter):
        base = source_record(resolve_source(adapter.base, local_only=True))
    if not isinstance(base.get("sha256"), str) or not SHA256.fullmatch(base["sha256"]):
        raise SourceError(f"{adapter.path}: cannot tell which base weights it was trained on (no fine-tune manifest "
                          f"beside it, and base_model_name_or_path {adapter.base!r} is not a model folder here); "
                          f"export it from its fine-tune folder (OUT/adapter)")
    return {"id": base.get("id") or adapter.base, "sha256": base["sha256"]}


def adapter_record(adapter: PeftAdapter, fmt: str) -> dict:
    return {"type": "lora", "format": fmt, "rank": adapter.rank, "alpha": adapter.alpha, "scale": adapter.scale,
            "parts": sorted(adapter.parts()), "modules": len(adapter.modules), "base": base_record(adapter)}


def check_pair(base_dir: Path, base_manifest: dict, adapter_dir: Path, adapter_manifest: dict | None) -> dict:
    """An adapter artifact fits a base artifact: the same format, and (where both know it) the same base weights."""
    record = (adapter_manifest or {}).get("adapter")
    if not isinstance(record, dict):
        raise ArtifactError(f"{adapter_dir}: not a pocketvlm adapter artifact (export one with: pocketvlm export "
                            f"FINETUNED/adapter --to {base_manifest.get('format')} --out DIR)")
    if adapter_manifest.get("format") != base_manifest.get("format"):
        raise ArtifactError(f"{adapter_dir} is a {adapter_manifest.get('format')} adapter; {base_dir} is a "
                            f"{base_manifest.get('format')} model: export the adapter --to "
                            f"{base_manifest.get('format')}")
    want = (record.get("base") or {}).get("sha256") if isinstance(record.get("base"), dict) else None
    have = (base_manifest.get("source") or {}).get("sha256") if isinstance(base_manifest.get("source"), dict) \
        else None
    if not isinstance(want, str) or not SHA256.fullmatch(want):
        raise ArtifactError(f"{adapter_dir}: its manifest does not say which base weights it was trained on "
                            f"(adapter.base.sha256); re-export it from its fine-tune folder")
    if not isinstance(have, str) or not SHA256.fullmatch(have):
        raise ArtifactError(f"{base_dir}: its manifest does not record the weights it was exported from "
                            f"(source.sha256), so an adapter cannot be checked against it; re-export it")
    if want != have:
        raise ArtifactError(f"{adapter_dir} was trained on another base model than {base_dir} was exported from "
                            f"(weights {want[:12]}... vs {have[:12]}...); export the base the adapter was trained on")
    return record


def refuse_adapter_as_model(path: Path, manifest: dict) -> None:
    if isinstance(manifest.get("adapter"), dict):
        raise PocketVLMError(f"{path} is a LoRA adapter, not a model: apply it to its base with "
                             f"pocketvlm ask BASE_ARTIFACT --adapter {path}")
