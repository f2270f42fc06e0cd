"""The GGUF backend: llama.cpp (through llama-cpp-python's low-level API and its multimodal library, mtmd), greedy,
on the CPU, fed exactly the prompt the reference sees.

llama.cpp re-implements SmolVLM's image tiling in C++ (older builds laid real-shape images out differently from
transformers; the one in llama-cpp-python 0.3.36 agrees for single images), has no SmolVLM video prompt, and its
generic chat handler renders "User: " with a stray space. So this backend never lets it lay out the prompt: it takes
pocketvlm's Processor output (the reference's token ids, tiles and order), encodes each tile as its own image through
mtmd -- with mtmd's preprocessing pinned to one tile of the encoder's size, so the tile reaches the vision encoder
unchanged -- and decodes the prompt itself: text runs as token batches, each run of <image> tokens as the embeddings
of its tile.

The files are read (and refused with one line when truncated, foreign or mismatched) by
pocketvlm/formats/gguf_reader.py before llama.cpp sees them; llama.cpp's log is captured by
pocketvlm/formats/llama_log.py. Imports neither torch nor transformers.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.formats.gguf import artifact_files
from pocketvlm.formats.gguf_reader import GGUFInfo, check_pair, decode_weight_bytes, read_gguf, text_embedding_length
from pocketvlm.formats.llama_log import ENGINE_LOG, default_threads, engine_version
from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled

# ------------------------------------------------------------------------------------------------ backend

def mmproj_quant(manifest: dict, mmproj: Path) -> str:
    """The mmproj's weight type as the export recorded it (gguf.mmproj_quant), else its file name's."""
    recorded = (manifest.get("gguf") or {}).get("mmproj_quant")
    return recorded if isinstance(recorded, str) else mmproj.stem.removeprefix("mmproj-")


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


def use_extra_buffers() -> bool:
    """Whether llama.cpp may put the text model's weights in its "extra" CPU buffer types (repacked layouts, and
    Intel AMX tiles). Its AMX matmul crashed (SIGSEGV in ggml_backend_amx_mul_mat) on q8_0/q4_k_m models of the
    tiny and micro shapes on a Xeon with AMX, while AMX itself worked there (a tile dot product gave the right
    answer), so on AMX CPUs they are off unless POCKETVLM_LLAMA_EXTRA_BUFFERS=1; elsewhere they stay on."""
    forced = os.environ.get("POCKETVLM_LLAMA_EXTRA_BUFFERS", "").strip()
    if forced:
        return forced not in ("0", "false", "no")
    return not cpu_has_amx()


@dataclass
class Prefill:
    """What the last prompt fed to llama.cpp was: token ids in order (each image embedding shown as the <image>
    id), how many tiles were encoded, and how many positions the KV cache holds afterwards."""

    token_ids: list[int]
    tiles: int
    n_past: int


def adapter_shape_problem(adapter: GGUFInfo, model: GGUFInfo) -> str | None:
    """Why a LoRA adapter's tensors do not fit the model's, or None. Each pair adapts the model tensor it is named
    after: lora_a reads what that tensor reads (its input width: the hidden size for attention and the MLP's
    gate/up, the intermediate size for ffn_down), lora_b writes what it writes, and both share one rank. ggml order:
    shape[0] is the input width."""
    weights = {t.name: t.shape for t in model.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in adapter.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix[-1]] = t.shape
    for name, pair in sorted(pairs.items()):
        base = weights.get(name)
        if base is None:
            return f"{name} is adapted but the model has no such tensor"
        a, b = pair.get("a"), pair.get("b")
        if a is None or b is None:
            return f"{name} has only one of lora_a / lora_b"
        if len(a) != 2 or len(b) != 2 or len(base) < 2 or a[0] != base[0] or b[1] != base[1] or a[1] != b[0]:
            return (f"{name}.lora_a/.lora_b have shapes {a} / {b}, which do not adapt the model's {name} of "
                    f"shape {base} (input x output)")
    return None


class GGUFBackend(Backend):
    name = "gguf"
    N_BATCH = 512  # tokens (or image embeddings) per llama_decode call
    vision_batch = 1  # mtmd encodes one image per call: each tile is its own image here (see the module doc)

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None,
                 adapter: Path | None = None):
        from pocketvlm.manifest import read_manifest

        self.path = Path(path)
        manifest = read_manifest(self.path) or {}
        self.quant = manifest.get("quant", "unknown")
        self.processor = Processor(self.path, image_size=image_size)
        self.model_file, self.mmproj_file = artifact_files(self.path, manifest)
        self.vision_weights = mmproj_quant(manifest, self.mmproj_file)
        model_info = read_gguf(self.model_file, "text model")
        mmproj_info = read_gguf(self.mmproj_file, "mmproj")
        check_pair(model_info, mmproj_info)
        self._check_vision_config(mmproj_info)
        self.n_embd = text_embedding_length(model_info)
        self.decode_weight_bytes = decode_weight_bytes(model_info)
        self.threads = threads or default_threads()
        self._model = self._ctx = self._mtmd = None
        self._n_ctx = 0
        self.last_prefill: Prefill | None = None

        try:
            import llama_cpp
            import llama_cpp.mtmd_cpp as mtmd
        except ModuleNotFoundError as e:
            raise PocketVLMError("running GGUF artifacts needs llama-cpp-python: pip install 'pocketvlm[gguf]'") \
                from e

        self._llama, self._mtmd_lib = llama_cpp, mtmd
        ENGINE_LOG.install()
        start = time.perf_counter()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.extra_buffers = use_extra_buffers()
        params.use_extra_bufts = self.extra_buffers
        ENGINE_LOG.clear()
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_file).encode(), params)
        if not self._model:
            raise ArtifactError(f"{self.model_file}: llama.cpp could not load the text model "
                                f"({ENGINE_LOG.errors() or 'no reason given'})")
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.adapter_file = self._adapter = None
        if adapter is not None:
            self._load_adapter(Path(adapter), model_info)
        self._ensure_context(min(self.context_length, 2048))
        cparams = mtmd.mtmd_context_params_default()
        cparams.use_gpu = False
        cparams.print_timings = False
        cparams.n_threads = self.threads
        # Pin mtmd's SmolVLM preprocessing to a single tile of the encoder's size: an image of exactly that size
        # then reaches the encoder as it is (every resize in its path is a same-size copy), so each tile the
        # Processor made is encoded unchanged instead of being re-tiled.
        cparams.image_max_tokens = self.processor.config.image_seq_len
        ENGINE_LOG.clear()
        self._mtmd = mtmd.mtmd_init_from_file(str(self.mmproj_file).encode(), self._model, cparams)
        if not self._mtmd:
            raise ArtifactError(f"{self.mmproj_file}: llama.cpp could not load the mmproj "
                                f"({ENGINE_LOG.errors() or 'no reason given'})")
        self.load_s = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------- setup

    def _check_vision_config(self, mmproj: GGUFInfo) -> None:
        cfg = self.processor.config
        md = mmproj.metadata
        size, patch = md.get("clip.vision.image_size"), md.get("clip.vision.patch_size")
        merge = md.get("clip.vision.projector.scale_factor", 1)
        if size != cfg.max_image_size:
            raise ArtifactError(f"{mmproj.path.name} encodes {size}px tiles but the artifact's processor makes "
                                f"{cfg.max_image_size}px tiles; the mmproj is from another model")
        if patch and (size // patch) ** 2 // (merge ** 2) != cfg.image_seq_len:
            raise ArtifactError(f"{mmproj.path.name} gives {(size // patch) ** 2 // merge ** 2} embeddings per tile, "
                                f"the prompt has {cfg.image_seq_len} <image> tokens per tile; the mmproj is from "
                                f"another model")
        mean, std = md.get("clip.vision.image_mean"), md.get("clip.vision.image_std")
        if not (cfg.do_rescale and abs(cfg.rescale_factor - 1 / 255) < 1e-9 and cfg.do_normalize
                and mean and std and np.allclose(mean, cfg.image_mean) and np.allclose(std, cfg.image_std)):
            raise ArtifactError(f"{self.path}: the processor's pixel normalisation differs from the mmproj's "
                                f"(mean/std/rescale); re-export the artifact from one checkpoint")

    def _ensure_context(self, n_tokens: int) -> None:
        """A llama context whose KV cache holds n_tokens (grown on demand, never past the model's context)."""
        llama_cpp = self._llama
        if n_tokens <= self._n_ctx:
            return
        n_ctx = min(self.context_length, -(-max(n_tokens, 256) // 256) * 256)
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.N_BATCH
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ENGINE_LOG.clear()
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise PocketVLMError(f"llama.cpp could not create a {n_ctx}-token context for {self.model_file.name} "
                                 f"({ENGINE_LOG.errors() or 'out of memory?'})")
        self._n_ctx = n_ctx
        if self._adapter:  # a context starts without adapters: set it on every one
            self._apply_adapter()

    def _load_adapter(self, folder: Path, model_info: GGUFInfo) -> None:
        """A LoRA adapter artifact's GGUF, checked before llama.cpp sees it (llama.cpp crashes on a file that is not
        an adapter of this architecture instead of refusing it), then loaded onto the text model."""
        from pocketvlm.manifest import read_manifest

        record = (read_manifest(folder) or {}).get("adapter") or {}
        name = record.get("file")
        path = folder / name if isinstance(name, str) and Path(name).name == name else None
        if path is None or not path.is_file():
            raise ArtifactError(f"{folder}: the adapter's GGUF ({name}) is missing; re-export the adapter")
        info = read_gguf(path, "LoRA adapter")
        if info.metadata.get("general.type") != "adapter" or info.metadata.get("adapter.type") != "lora":
            raise ArtifactError(f"{path}: not a LoRA adapter GGUF; re-export the adapter")
        if info.architecture != model_info.architecture:
            raise ArtifactError(f"{path} adapts a {info.architecture} model; {self.model_file.name} is "
                                f"{model_info.architecture}")
        problem = adapter_shape_problem(info, model_info)
        if problem:
            raise ArtifactError(f"{path}: {problem}; the adapter is for another base")
        ENGINE_LOG.clear()
        self._adapter = self._llama.llama_adapter_lora_init(self._model, str(path).encode())
        if not self._adapter:  # a NULL pointer, which ctypes gives as a falsy object, not None
            raise ArtifactError(f"{path}: llama.cpp could not load the adapter ({ENGINE_LOG.errors() or 'no reason'})")
        self.adapter_file = path

    def _apply_adapter(self) -> None:
        llama_cpp = self._llama
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(1.0)  # the adapter's own alpha / rank is applied by llama.cpp on top
        if llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
            raise ArtifactError(f"{self.adapter_file}: llama.cpp could not apply the adapter "
                                f"({ENGINE_LOG.errors() or 'no reason given'})")

    def describe(self) -> dict:
        return {**super().describe(), "engine": f"llama-cpp-python {engine_version()} (llama.cpp + mtmd)",
                "threads": self.threads, "model": self.model_file.name, "mmproj": self.mmproj_file.name,
                "context": self._n_ctx, "decode_weight_bytes": self.decode_weight_bytes,
                "extra_buffers": self.extra_buffers,
                **({"adapter": str(self.adapter_file)} if self.adapter_file else {})}

    def close(self) -> None:
        llama_cpp = getattr(self, "_llama", None)
        if llama_cpp is None:
            return
        if getattr(self, "_mtmd", None):
            self._mtmd_lib.mtmd_free(self._mtmd)
            self._mtmd = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --------------------------------------------------------------------------------------------- vision

    def _tile_pixels(self, tile: np.ndarray, mask: np.ndarray) -> bytes:
        """A normalised float CHW tile back to the 8-bit RGB pixels it was made from (mtmd takes 8-bit
        images and normalises them itself, with the same mean/std)."""
        cfg = self.processor.config
        side = cfg.max_image_size
        if tile.shape != (3, side, side) or not mask.all():
            raise RuntimeError(f"bug: tile of shape {tile.shape} with padding; SmolVLM tiles are {side}x{side}")
        x = tile.astype(np.float64) * np.asarray(cfg.image_std)[:, None, None] + \
            np.asarray(cfg.image_mean)[:, None, None]
        x = x / cfg.rescale_factor
        pixels = np.rint(x)
        if np.abs(pixels - x).max() > 0.05 or pixels.min() < 0 or pixels.max() > 255:
            raise RuntimeError("bug: a tile does not map back to 8-bit pixels")
        return np.ascontiguousarray(pixels.astype(np.uint8).transpose(1, 2, 0)).tobytes()

    def _encode_tile(self, pixels: bytes) -> np.ndarray:
        """[image_seq_len, n_embd] embeddings of one tile, through mtmd's vision encoder + projector."""
        mtmd = self._mtmd_lib
        side = self.processor.config.max_image_size
        data = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
        bitmap = mtmd.mtmd_bitmap_init(side, side, data)
        if not bitmap:
            raise RuntimeError("mtmd_bitmap_init failed")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            rc = mtmd.mtmd_tokenize_from_parts(self._mtmd, chunks, parts, 1, False)
            if rc != 0:
                raise PocketVLMError(f"llama.cpp (mtmd) could not prepare an image tile (code {rc}: "
                                     f"{ENGINE_LOG.errors() or 'no reason given'})")
            images = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            images = [c for c in images if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            n = self.processor.config.image_seq_len
            # Pinned to one tile, mtmd makes that tile once as a slice and once as the overview, both copies of
            # the input; encoding one is enough.
            chunk = images[0] if images else None
            if chunk is None or mtmd.mtmd_input_chunk_get_n_tokens(chunk) != n:
                got = mtmd.mtmd_input_chunk_get_n_tokens(chunk) if chunk else 0
                raise RuntimeError(f"mtmd turned a {side}px tile into {len(images)} image(s) of {got} tokens, "
                                   f"expected {n}")
            if mtmd.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                raise PocketVLMError(f"llama.cpp's vision encoder failed ({ENGINE_LOG.errors() or 'no reason'})")
            out = mtmd.mtmd_get_output_embd(self._mtmd)
            return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def image_features(self, enc: Encoded) -> np.ndarray:
        """[tiles, image_seq_len, n_embd]: each tile through mtmd's vision encoder + projector, one at a time."""
        return np.stack([self._encode_tile(self._tile_pixels(tile, mask))
                         for tile, mask in zip(enc.pixel_values[0], enc.pixel_attention_mask[0])])

    # ------------------------------------------------------------------------------------------ decoding

    def _segments(self, ids: np.ndarray, n_tiles: int) -> list[tuple[str, int, int]]:
        """The prompt as (kind, start, end) runs: 'text' token runs and 'image' runs of one tile each."""
        n = self.processor.config.image_seq_len
        is_image = ids == self.processor.image_token_id
        segments, start = [], 0
        while start < len(ids):
            end = start
            while end < len(ids) and is_image[end] == is_image[start]:
                end += 1
            if is_image[start]:
                if (end - start) % n:
                    raise RuntimeError(f"bug: a run of {end - start} <image> tokens, not a multiple of {n}")
                segments += [("image", s, s + n) for s in range(start, end, n)]
            else:
                segments.append(("text", start, end))
            start = end
        if sum(kind == "image" for kind, _, _ in segments) != n_tiles:
            raise RuntimeError(f"bug: {n_tiles} tiles for {sum(k == 'image' for k, _, _ in segments)} image runs")
        return segments

    def _decode_tokens(self, tokens: Sequence[int]) -> None:
        llama_cpp = self._llama
        for s in range(0, len(tokens), self.N_BATCH):
            part = tokens[s:s + self.N_BATCH]
            arr = (llama_cpp.llama_token * len(part))(*part)
            self._decode(llama_cpp.llama_batch_get_one(arr, len(part)))

    def _decode_embeddings(self, embd: np.ndarray) -> None:
        llama_cpp = self._llama
        for s in range(0, len(embd), self.N_BATCH):
            part = np.ascontiguousarray(embd[s:s + self.N_BATCH], dtype=np.float32)
            batch = llama_cpp.llama_batch()  # positions, sequence and outputs left to llama.cpp's defaults
            batch.n_tokens = len(part)
            batch.embd = part.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self._decode(batch)

    def _decode(self, batch) -> None:
        rc = self._llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise PocketVLMError(f"llama.cpp could not decode the prompt (llama_decode returned {rc}: "
                                 f"{ENGINE_LOG.errors() or 'no reason given'})")

    def _logits(self) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        ids = enc.input_ids
        start = time.perf_counter()
        embeddings = self.image_features(enc) if enc.pixel_values is not None else []
        encoded = time.perf_counter()
        segments = self._segments(ids, len(embeddings))
        self._ensure_context(min(self.context_length, len(ids) + budget))
        self._llama.llama_memory_clear(self._llama.llama_get_memory(self._ctx), True)
        tiles = iter(embeddings)
        fed: list[int] = []  # what llama.cpp was given, <image> standing for each embedding
        for kind, s, e in segments:
            if kind == "text":
                self._decode_tokens(ids[s:e].tolist())
                fed += ids[s:e].tolist()
            else:
                tile = next(tiles)
                self._decode_embeddings(tile)
                fed += [self.processor.image_token_id] * len(tile)
        memory = self._llama.llama_get_memory(self._ctx)
        self.last_prefill = Prefill(token_ids=fed, tiles=len(embeddings),
                                    n_past=self._llama.llama_memory_seq_pos_max(memory, 0) + 1)
        return Prefilled(self._logits(), (encoded - start) if len(embeddings) else None)

    def decode(self, state, token_id: int, position: int):
        self._decode_tokens([token_id])
        return self._logits()
