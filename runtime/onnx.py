"""ONNX backend: the three-part SmolVLM layout (pocketvlm/formats/onnx.py: the one Hugging Face's ONNX repos and
transformers.js load) on onnxruntime. Does not import torch or transformers.

The prompt and pixels come from pocketvlm.prompt, so the tokens are the reference's by construction. Image
features are written over the embeddings at the <image> positions here, on the host, as transformers.js does; the
decoder is one graph for prefill (past length 0) and every decode step.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, one_line
from pocketvlm.formats.onnx import DATA_SUFFIX, PARTS, SUFFIXES, part_file, past_name
from pocketvlm.manifest import read_manifest
from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled, real_tiles, tile_batches


class ONNXBackend(Backend):
    name = "onnx"
    # each extra tile per call adds its activations to the peak (~320-440 MB at 500M: docs/BENCH.md "Vision tiles
    # per call"); at one, int8 at 13 tiles peaks at 888 MB
    vision_batch = 1
    # The prompt goes through the decoder this many tokens per call. In one call an 877-token prompt (13 tiles) made
    # logits for every position (173 MB at 500M) and every layer's scores over the whole prompt, and the decoder's
    # arena kept that high-water mark for the session. Measured at the 500M shape, 2 threads, 4 requests: 13 tiles
    # q4 1311 -> 1066 MB, int8 1370 -> 1126 MB, TTFT no slower (6.9 vs 7.7 s); 64 and 256 were no better.
    prefill_chunk = 128

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        manifest = read_manifest(self.path) or {}
        self.quant = manifest.get("quant", "unknown")
        if self.quant not in SUFFIXES:
            raise ArtifactError(f"{self.path}: unknown ONNX quant {self.quant!r} in pocketvlm.json; re-export")
        self.processor = Processor(self.path, image_size=image_size)
        self.vision_weights = vision_weights(manifest, self.quant)
        self.threads = threads
        self.files = {part: self.path / part_file(self.quant, part) for part in PARTS}
        listed = {entry["path"] for entry in manifest.get("files", [])}
        for part in PARTS:
            graph = part_file(self.quant, part)
            for name, what in ((graph, f"the {part} graph"), (graph + DATA_SUFFIX, f"the weights of {graph}")):
                if (name == graph or name in listed) and not (self.path / name).is_file():
                    raise ArtifactError(f"{self.path}: {name} ({what}) is missing; re-export the artifact")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; they become one-line ArtifactErrors below
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # The vision encoder's and the prompt's activations are the largest a request makes, and onnxruntime keeps
        # a session's arena at its high-water mark: the vision arena was still held while the decoder's prefill grew
        # its own. Calls that make them give the arena's free regions back when they return (decode steps, small and
        # many, keep theirs). Measured at the 500M shape, int8, 1 thread: 13 tiles peak 1421 -> 1191 MB, one tile
        # 885 -> 852 MB, no slower (docs/BENCH.md "Vision tiles per call"). A region still holding an output cannot
        # be given back, so every call writes its outputs into numpy arrays of ours (_bind_output) instead.
        self.release_arena = ort.RunOptions()
        self.release_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        start = time.perf_counter()
        self.sessions = {part: _session(ort, f, options, self.path) for part, f in self.files.items()}
        self.load_s = time.perf_counter() - start
        self.vision = self.sessions["vision_encoder"]
        self.embed = self.sessions["embed_tokens"]
        self.decoder = self.sessions["decoder_model_merged"]
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        self.past_inputs = {i.name: i for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")}
        expected = {past_name(n) for n in self.output_names[1:]}
        if self.output_names[:1] != ["logits"] or set(self.past_inputs) != expected or not expected:
            raise ArtifactError(f"{self.path}: {part_file(self.quant, 'decoder_model_merged')} does not have the "
                                f"decoder_model_merged inputs/outputs (logits, present.* <-> past_key_values.*)")
        first = next(iter(self.past_inputs.values()))
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self.logits_spec = _static_output(self.decoder, "logits", self.path, dynamic=2)
        self.features_spec = _static_output(self.vision, self.vision.get_outputs()[0].name, self.path,
                                            dynamic=1)

    def describe(self) -> dict:
        import onnxruntime as ort

        # what one decode step reads: the decoder's weights (the embedding table is its own part, one row per step)
        decoder = self.files["decoder_model_merged"]
        data = decoder.with_name(decoder.name + DATA_SUFFIX)
        read = decoder.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        return {**super().describe(), "engine": f"onnxruntime {ort.__version__}",
                "providers": self.decoder.get_providers(), "threads": self.threads,
                "decode_weight_bytes": read}

    # ------------------------------------------------------------------------------------ the three parts

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """[batch, seq] int64 -> [batch, seq, hidden] float32."""
        return self.embed.run(None, {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)})[0]

    def image_features(self, enc: Encoded) -> np.ndarray:
        """Vision encoder + connector for one request's tiles -> [tiles, image_seq_len, hidden], vision_batch
        tiles per session call (padding tiles dropped first, as transformers does)."""
        tiles, masks = real_tiles(enc.pixel_values, enc.pixel_attention_mask)
        name, (per_tile, hidden), dtype = self.features_spec
        features = np.empty((len(tiles), per_tile, hidden), dtype)
        for batch in tile_batches(len(tiles), self.vision_batch):
            binding = self.vision.io_binding()
            binding.bind_cpu_input("pixel_values", np.ascontiguousarray(tiles[batch][None], dtype=np.float32))
            binding.bind_cpu_input("pixel_attention_mask", np.ascontiguousarray(masks[batch][None], dtype=bool))
            _bind_output(binding, name, features[batch])
            self.vision.run_with_iobinding(binding, self.release_arena)
        return features.astype(np.float32, copy=False)

    def merge(self, input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Write image features over the embeddings of the <image> tokens, in order (masked_scatter's order)."""
        features = features.reshape(-1, features.shape[-1])
        slots = input_ids == self.processor.image_token_id
        if int(slots.sum()) != len(features):
            raise ArtifactError(f"{self.path}: the vision encoder gave {len(features)} image embeddings for "
                                f"{int(slots.sum())} <image> tokens; the artifact does not match its processor")
        embeds[slots] = features.astype(embeds.dtype, copy=False)
        return embeds

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for name in self.past_inputs}

    def step(self, embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: dict, run_options=None) -> tuple[np.ndarray, dict]:
        """One decoder call -- logits [batch, seq, vocab] and the grown KV cache -- through an IO binding:
        onnxruntime reads the inputs and the cache from our numpy arrays and writes the logits and the grown cache
        into new ones of ours, with no copy either way (a copy of the cache each step is ~300 MB per token at the
        2.2B shape with a long image prompt). Outputs onnxruntime allocated itself would live in the decoder's
        arena, pinning its regions: the cache kept the prompt's high-water mark for the whole session. 500M shape,
        q4, 13 tiles, 4 requests: peak RSS 1087 -> 837 MB with the vision features bound the same way, decode speed
        unchanged."""
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        for name, value in past.items():
            binding.bind_cpu_input(name, value)
        batch, seq, total = embeds.shape[0], embeds.shape[1], attention_mask.shape[1]
        name, (vocab,), dtype = self.logits_spec
        logits = _bind_output(binding, name, np.empty((batch, seq, vocab), dtype))
        cache_shape = (batch, self.kv_heads, total, self.head_dim)
        grown = {past_name(name): _bind_output(binding, name, np.empty(cache_shape, self.kv_dtype))
                 for name in self.output_names[1:]}
        self.decoder.run_with_iobinding(binding, run_options)
        return logits, grown

    # ------------------------------------------------------------------------------------------- decoding

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        ids = enc.input_ids[None]
        start = time.perf_counter()
        features = self.image_features(enc) if enc.pixel_values is not None else None
        encoded = time.perf_counter()
        embeds = self.embed_tokens(ids)
        if features is not None:
            embeds = self.merge(ids, embeds, features)
        n_prompt, past = ids.shape[1], self.empty_past(1)
        for first in range(0, n_prompt, self.prefill_chunk):
            end = min(n_prompt, first + self.prefill_chunk)
            logits, past = self.step(embeds[:, first:end], np.ones((1, end), np.int64),
                                     np.arange(first, end)[None], past, self.release_arena)
        # a copy of the last row, not a view, so the chunk's logits are freed
        return Prefilled(logits[0, -1].copy(), (encoded - start) if features is not None else None, {"past": past})

    def decode(self, state, token_id: int, position: int):
        step_embeds = self.embed_tokens(np.array([[token_id]], np.int64))
        logits, state["past"] = self.step(step_embeds, np.ones((1, position + 1), np.int64),
                                          np.array([[position]], np.int64), state["past"])
        return logits[0, -1]


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _static_output(session, name: str, root: Path, dynamic: int) -> tuple[str, tuple[int, ...], type]:
    """An output's name, its fixed dimensions after the first `dynamic` ones, and its numpy type, so calls can
    write it into an array of ours. The layout has 3-d outputs: logits [batch, seq, vocab], image features
    [tiles, image_seq_len, hidden]."""
    output = next((o for o in session.get_outputs() if o.name == name), None)
    tail = tuple(output.shape[dynamic:]) if output is not None and len(output.shape) == 3 else ()
    if output is None or output.type not in _NUMPY_TYPES or not tail or not all(isinstance(d, int) for d in tail):
        raise ArtifactError(f"{root}: the {name!r} output of a graph has no fixed shape and float type "
                            f"({None if output is None else (output.shape, output.type)}); re-export the artifact")
    return name, tail, _NUMPY_TYPES[output.type]


def _bind_output(binding, name: str, array: np.ndarray) -> np.ndarray:
    """Have onnxruntime write output `name` into `array` (C-contiguous, of the output's exact shape and type)."""
    binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    return array


def _one_line(e: Exception, limit: int = 200) -> str:
    """onnxruntime's message without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix, on one line."""
    return one_line(re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", one_line(e)), limit)


def vision_weights(manifest: dict, quant: str) -> str:
    """What the vision encoder's weights are: the manifest says (quantize/onnx.py method()); artifacts made before it
    did had the vision encoder in the artifact's own quant."""
    info = ((manifest.get("onnx") or {}).get("quantization") or {}).get("vision")
    return info if isinstance(info, str) else quant


def _session(ort, path: Path, options, root: Path):
    """An InferenceSession, any failure to load (truncated or corrupt graph, missing weights file) as one line."""
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/RuntimeException types
        raise ArtifactError(f"{root}: onnxruntime cannot load {path.relative_to(root)} ({_one_line(e)}); "
                            f"the artifact is corrupt or incomplete, re-export it") from e
