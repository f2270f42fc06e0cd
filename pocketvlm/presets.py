"""Model presets, read from data/presets.json (the data; this is only the reader)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from .errors import PocketVLMError


@lru_cache(maxsize=None)
def _load() -> dict:
    return json.loads(resources.files("pocketvlm").joinpath("data/presets.json").read_text())


def preset_names() -> list[str]:
    return [k for k in _load() if not k.startswith("_")]


def preset(name: str) -> dict:
    presets = _load()
    if name.startswith("_") or name not in presets:
        raise PocketVLMError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return presets[name]


def tokenizer_layout(name: str) -> dict:
    return _load()["_tokenizers"][name]


def image_seq_len(p: dict) -> int:
    """Image tokens per tile: (image_size / patch)^2 patches, pixel-shuffled by scale_factor^2."""
    v = p["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2 // p["scale_factor"] ** 2
