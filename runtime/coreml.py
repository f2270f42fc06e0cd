"""Core ML backend: the two packages of a Core ML artifact (layout in pocketvlm/formats/coreml.py) on Apple's Core ML
runtime, macOS 15 or later. Does not import torch.

    VisionEncoder.mlpackage  the request's tiles -> image features, written over the <image> embeddings on the host
    TextDecoder.mlpackage    prefill (the whole prompt in one call), then one call per token; the KV cache is the
                             model's state (make_state()), so nothing but embeddings and a mask cross per step
    embed_tokens.npy         the host-side embedding table (a row per fed token)

The prompt and pixels come from pocketvlm.prompt, so the tokens are the reference's by construction. Core ML
prediction exists only on macOS: elsewhere the constructor refuses with one line (conversion and the spec checks
run on Linux; see tests/test_coreml.py).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, PocketVLMError, one_line
from pocketvlm.formats.coreml import (DECODER, EMBEDDINGS, FORMAT, VISION, causal_mask, compute_units,
                                      compute_units_note)
from pocketvlm.manifest import read_manifest
from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled, tile_batches


def require_macos(path: Path) -> None:
    system = platform.system()
    if system != "Darwin":
        name = {"Linux": "Linux", "Windows": "Windows"}.get(system, system or "this system")
        raise PocketVLMError(f"Core ML runs only on macOS (this is {name}): {path} needs macOS 15 or later to run; "
                             f"use the onnx, gguf or mlx format here")
    release = platform.mac_ver()[0]
    major = int(release.split(".")[0]) if release and release.split(".")[0].isdigit() else 0
    if major and major < 15:
        raise PocketVLMError(f"{path} needs macOS 15 or later (stateful Core ML models); this is macOS {release}")


class CoreMLBackend(Backend):
    name = "coreml"
    vision_batch = 1  # tiles per predict: unmeasured (no Mac); ONNX's measured choice, docs/BENCH.md

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None):
        self.path = Path(path)
        require_macos(self.path)
        import coremltools as ct

        manifest = read_manifest(self.path) or {}
        self.quant = manifest.get("quant", "unknown")
        if self.quant not in FORMAT.export_quants:
            raise ArtifactError(f"{self.path}: unknown Core ML quant {self.quant!r} in pocketvlm.json; re-export")
        for name in (VISION, DECODER, EMBEDDINGS):
            if not (self.path / name).exists():
                raise ArtifactError(f"{self.path}: {name} is missing; re-export the artifact")
        self.processor = Processor(self.path, image_size=image_size)
        self.threads = threads  # Core ML schedules its own threads; kept for describe()
        self.vision_weights = ((manifest.get("quantization") or {}).get("vision") or self.quant)
        # the quant's compute units (pocketvlm.formats.coreml.COMPUTE_UNITS says why int4 is off the Neural Engine)
        units = getattr(ct.ComputeUnit, compute_units(self.quant)) if threads is None else ct.ComputeUnit.CPU_ONLY
        start = time.perf_counter()
        try:
            self.vision = ct.models.MLModel(str(self.path / VISION), compute_units=units)
            self.decoder = ct.models.MLModel(str(self.path / DECODER), compute_units=units)
        except Exception as e:
            raise ArtifactError(f"{self.path}: Core ML cannot load the packages ({one_line(e, 200)}); re-export it") \
                from e
        self.embeddings = np.load(self.path / EMBEDDINGS, mmap_mode="r")
        self.load_s = time.perf_counter() - start
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in self.decoder.get_spec().description.state}
        if set(states) != {"k_cache", "v_cache"}:
            raise ArtifactError(f"{self.path}: {DECODER} has no k_cache/v_cache states; re-export the artifact")
        self.max_context = int(states["k_cache"][3])
        pixels = self.vision.get_spec().description.input[0].type.multiArrayType
        self.max_tiles = int(pixels.shapeRange.sizeRanges[0].upperBound) if pixels.HasField("shapeRange") else 1
        self.units = units

    def describe(self) -> dict:
        import coremltools as ct

        decoder = self.path / DECODER / "Data" / "com.apple.CoreML" / "weights"
        read = sum(f.stat().st_size for f in decoder.rglob("*") if f.is_file())
        return {**super().describe(), "engine": f"Core ML (coremltools {ct.__version__})",
                "compute_units": self.units.name,
                **({"compute_units_note": note} if (note := compute_units_note(self.quant)) and self.threads is None
                   else {}),
                "max_context": self.max_context,
                "decode_weight_bytes": read}

    # ------------------------------------------------------------------------------------------- the parts

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """[1, seq] -> [1, seq, hidden] float32 (the table is fp16 on disk)."""
        return np.asarray(self.embeddings[np.asarray(input_ids, dtype=np.int64)], dtype=np.float32)

    def image_features(self, enc: Encoded) -> np.ndarray:
        """[1, tiles, 3, S, S] -> [tiles, image_seq_len, hidden], vision_batch tiles per predict (never more than
        the package's tile range). Tiles from pocketvlm.prompt are full squares (no padding tile for a single
        request)."""
        tiles = np.ascontiguousarray(enc.pixel_values.reshape(-1, *enc.pixel_values.shape[2:]), dtype=np.float32)
        parts = [np.asarray(self.vision.predict({"pixel_values": tiles[b]})["image_features"], dtype=np.float32)
                 for b in tile_batches(len(tiles), min(self.vision_batch, self.max_tiles))]
        return np.concatenate(parts)

    def merge(self, input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray) -> np.ndarray:
        features = features.reshape(-1, features.shape[-1])
        slots = input_ids == self.processor.image_token_id
        if int(slots.sum()) != len(features):
            raise ArtifactError(f"{self.path}: the vision encoder gave {len(features)} image embeddings for "
                                f"{int(slots.sum())} <image> tokens; the artifact does not match its processor")
        embeds[slots] = features
        return embeds

    def forward(self, embeds: np.ndarray, start: int, state) -> np.ndarray:
        """Feed [1, q, hidden] at positions start .. start + q - 1; the last position's logits [vocab]."""
        q = embeds.shape[1]
        out = self.decoder.predict({"inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
                                    "position_ids": np.arange(start, start + q, dtype=np.int32)[None],
                                    "causal_mask": causal_mask(q, start + q)}, state=state)
        return np.asarray(out["logits"], dtype=np.float32).reshape(-1)

    # ------------------------------------------------------------------------------------------- decoding

    @property
    def context_length(self) -> int:
        return min(self.processor.config.context_length, self.max_context)

    context_hint = "re-export with a longer --max-context, or use fewer/smaller images"

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        ids = enc.input_ids[None]
        start = time.perf_counter()
        features = self.image_features(enc) if enc.pixel_values is not None else None
        encoded = time.perf_counter()
        embeds = self.embed_tokens(ids)
        if features is not None:
            embeds = self.merge(ids, embeds, features)
        state = self.decoder.make_state()
        logits = self.forward(embeds, 0, state)
        return Prefilled(logits, (encoded - start) if features is not None else None, state)

    def decode(self, state, token_id: int, position: int):
        return self.forward(self.embed_tokens(np.array([[token_id]])), position, state)
