"""The GGUF backend: llama.cpp (through llama-cpp-python's low-level API and its multimodal library, mtmd), greedy,
on the CPU, fed exactly the prompt the reference sees.

llama.cpp re-implements SmolVLM's image tiling in C++ (older builds laid real-shape images out differently from
transformers; the one in llama-cpp-python 0.3.36 agrees for single images), has no SmolVLM video prompt, and its
generic chat handler renders "User: " with a stray space. So this backend never lets it lay out the prompt: it takes
pocketvlm's Processor output (the reference's token ids, tiles and order), encodes each tile as its own image through
mtmd -- with mtmd's preprocessing pinned to one tile of the encoder's size, so the tile reaches the vision encoder
unchanged -- and decodes the prompt itself: text runs as token batches, each run of <image> tokens as the embeddings
of its tile.

Also here: a small reader of the GGUF container (header, metadata, tensor table) with no dependency, used to refuse
truncated, foreign or mismatched files with one line before llama.cpp sees them, and to report tensor types.
Imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.prompt import Processor, Request

from .base import Backend, Step, TextStream, next_input

# ------------------------------------------------------------------------------------------- GGUF reader

GGUF_MAGIC = b"GGUF"
# ggml type id -> (name as llama.cpp prints it, elements per block, bytes per block)
GGML_TYPES = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 36), 10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144), 13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98), 19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110), 22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1), 25: ("i16", 1, 2), 26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56), 30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
}
# metadata value type -> struct format (fixed-size scalars)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_KEPT = 64  # longer arrays (vocabularies) are skipped, their length kept


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_id: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}",))[0]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int | None:
        if self.type_id not in GGML_TYPES:
            return None
        _, block, size = GGML_TYPES[self.type_id]
        return self.n_elements // block * size


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict
    tensors: list[GGUFTensor]
    data_offset: int
    size: int
    arrays: dict = field(default_factory=dict)  # key -> length, for arrays too long to keep

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bytes x 8 / parameters, over every tensor (as llama.cpp's quantizer reports BPW)."""
        return self.tensor_bytes * 8 / max(self.n_elements, 1)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise _Truncated
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 24 or self.pos + n > len(self.buf):
            raise _Truncated if self.pos + n > len(self.buf) else _Corrupt(f"a {n}-byte string")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if count > 1 << 32:
                raise _Corrupt(f"an array of {count} items")
            if count > _MAX_ARRAY_KEPT:
                if etype in _SCALARS:
                    n = struct.calcsize(_SCALARS[etype]) * count
                    if self.pos + n > len(self.buf):
                        raise _Truncated
                    self.pos += n
                else:
                    for _ in range(count):
                        self.value(etype)
                return _Skipped(count)
            return [self.value(etype) for _ in range(count)]
        raise _Corrupt(f"unknown metadata type {vtype}")


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


@dataclass
class _Skipped:
    length: int


def decode_weight_bytes(info: GGUFInfo) -> int:
    """What one decode step reads from the text model: every tensor but the token embedding table (one row per
    step), unless the table doubles as the output head (no output.weight)."""
    tied = info.tensor("output.weight") is None
    return sum(t.nbytes or 0 for t in info.tensors if tied or t.name != "token_embd.weight")


def read_gguf(path: Path, what: str | None = None) -> GGUFInfo:
    """Header, metadata and tensor table of a GGUF file, checked for being complete. One-line ArtifactError if the
    file is missing, is not GGUF, or is cut short."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    if not path.is_file():
        raise ArtifactError(f"{label}: no such file; re-export the artifact")
    size = path.stat().st_size
    if size == 0:
        raise ArtifactError(f"{label}: empty file (0 bytes); re-export the artifact")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ArtifactError(f"{label}: not a GGUF file (no GGUF magic); re-export the artifact")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(buf, path, size)
            except _Truncated:
                raise ArtifactError(f"{label}: truncated GGUF file ({size} bytes, its header runs past the end); "
                                    f"re-export the artifact") from None
            except _Corrupt as e:
                raise ArtifactError(f"{label}: corrupt GGUF file ({e}); re-export the artifact") from None


def _parse(buf, path: Path, size: int) -> GGUFInfo:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise _Corrupt(f"GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise _Corrupt(f"{n_tensors} tensors / {n_kv} metadata entries")
    metadata, arrays = {}, {}
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"))
        if isinstance(value, _Skipped):
            arrays[key] = value.length
        else:
            metadata[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 8:
            raise _Corrupt(f"tensor {name} with {n_dims} dimensions")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        tensors.append(GGUFTensor(name, shape, cur.take("<I"), cur.take("<Q")))
    alignment = int(metadata.get("general.alignment", 32)) or 32
    data_offset = -(-cur.pos // alignment) * alignment
    end = data_offset + max((t.offset + (t.nbytes or 0) for t in tensors), default=0)
    if end > size:
        missing = next(t for t in tensors if data_offset + t.offset + (t.nbytes or 0) > size)
        raise ArtifactError(f"{path}: truncated GGUF file ({size} bytes, tensor {missing.name} needs bytes up to "
                            f"{data_offset + missing.offset + (missing.nbytes or 0)}); re-export the artifact")
    return GGUFInfo(path, version, metadata, tensors, data_offset, size, arrays)


def text_embedding_length(model: GGUFInfo) -> int | None:
    arch = model.architecture
    value = model.metadata.get(f"{arch}.embedding_length")
    if value is None and (emb := model.tensor("token_embd.weight")) is not None:
        value = emb.shape[0]
    return int(value) if value is not None else None


def mmproj_projection_dim(mmproj: GGUFInfo) -> int | None:
    """What the projector outputs: the text model's embedding width it was built for."""
    fc = mmproj.tensor("mm.model.fc.weight")
    if fc is not None and len(fc.shape) >= 2:
        return int(fc.shape[1])
    value = mmproj.metadata.get("clip.vision.projection_dim")
    return int(value) if value is not None else None


def check_pair(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """The text model and the mmproj belong together: a llama text model, a SmolVLM (idefics3) vision projector,
    and the projector's output width equal to the text model's embedding width."""
    if model.architecture in (None, "clip"):
        raise ArtifactError(f"{model.path}: not a text model GGUF (architecture {model.architecture!r}); "
                            f"re-export the artifact")
    if mmproj.architecture != "clip" or not mmproj.metadata.get("clip.has_vision_encoder", False):
        raise ArtifactError(f"{mmproj.path}: not a vision mmproj GGUF (architecture {mmproj.architecture!r}); "
                            f"re-export the artifact")
    proj_type = mmproj.metadata.get("clip.projector_type") or mmproj.metadata.get("clip.vision.projector_type")
    if proj_type != "idefics3":
        raise ArtifactError(f"{mmproj.path}: projector type {proj_type!r}, not SmolVLM's 'idefics3'; "
                            f"this mmproj is from another kind of model")
    n_text, n_proj = text_embedding_length(model), mmproj_projection_dim(mmproj)
    if n_text is None or n_proj is None:
        raise ArtifactError(f"{model.path.parent}: cannot read the embedding widths of the text model / mmproj; "
                            f"re-export the artifact")
    if n_text != n_proj:
        raise ArtifactError(f"{mmproj.path.name} projects images to {n_proj}-dim embeddings but "
                            f"{model.path.name} takes {n_text}: the mmproj is from another model; "
                            f"re-export both from the same checkpoint")


# ------------------------------------------------------------------------------------------ llama.cpp log

class _EngineLog:
    """llama.cpp / ggml / mtmd log lines go here instead of the terminal (POCKETVLM_LLAMA_LOG=1 shows them):
    the recent ones explain a failure in one line; captures collect a whole operation's log (the quantizer's
    per-tensor report)."""

    def __init__(self):
        self.recent: deque[tuple[int, str]] = deque(maxlen=400)
        self.captures: list[list[str]] = []
        self.lock = threading.Lock()
        self.installed = False
        self._callback = None

    def install(self) -> None:
        if self.installed:
            return
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        show = os.environ.get("POCKETVLM_LLAMA_LOG", "").strip() not in ("", "0")

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            message = text.decode("utf-8", "replace") if text else ""
            with self.lock:
                self.recent.append((level, message))
                for capture in self.captures:
                    capture.append(message)
            if show:
                sys.stderr.write(message)

        self._callback = callback  # keep the C function pointer alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
            if hasattr(mtmd, setter):
                getattr(mtmd, setter)(callback, ctypes.c_void_p(0))
        self.installed = True

    def errors(self, limit: int = 1) -> str:
        """The last error-level message(s), one line."""
        with self.lock:
            lines = [m.strip() for level, m in self.recent if level == 3 and m.strip()]
        text = " ".join(lines[-limit:])
        return " ".join(text.split())[:300]

    def clear(self) -> None:
        with self.lock:
            self.recent.clear()

    @contextlib.contextmanager
    def capture(self):
        """Collect every log message emitted inside the block."""
        lines: list[str] = []
        with self.lock:
            self.captures.append(lines)
        try:
            yield lines
        finally:
            with self.lock:
                self.captures.remove(lines)


ENGINE_LOG = _EngineLog()


def engine_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ backend

def artifact_files(path: Path, manifest: dict | None) -> tuple[Path, Path]:
    """The text model and mmproj files of a GGUF artifact, as its manifest names them."""
    roles = (manifest or {}).get("gguf") or {}
    model = roles.get("model") or next((p.name for p in sorted(path.glob("model-*.gguf"))), None)
    mmproj = roles.get("mmproj") or next((p.name for p in sorted(path.glob("mmproj-*.gguf"))), None)
    if model is None or not (path / model).is_file():
        raise ArtifactError(f"{path}: the text model GGUF ({model or 'model-*.gguf'}) is missing; "
                            f"re-export the artifact")
    if mmproj is None or not (path / mmproj).is_file():
        raise ArtifactError(f"{path}: the mmproj GGUF ({mmproj or 'mmproj-*.gguf'}, vision encoder + projector) is "
                            f"missing; re-export the artifact")
    return path / model, path / mmproj


@dataclass
class Prefill:
    """What the last prompt fed to llama.cpp was: token ids in order (each image embedding shown as the <image>
    id), how many tiles were encoded, and how many positions the KV cache holds afterwards."""

    token_ids: list[int]
    tiles: int
    n_past: int


class GGUFBackend(Backend):
    name = "gguf"
    N_BATCH = 512  # tokens (or image embeddings) per llama_decode call

    def __init__(self, path: Path, threads: int | None = None):
        from pocketvlm.manifest import read_manifest

        self.path = Path(path)
        manifest = read_manifest(self.path) or {}
        self.quant = manifest.get("quant", "unknown")
        self.processor = Processor(self.path)
        self.model_file, self.mmproj_file = artifact_files(self.path, manifest)
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
        except ModuleNotFoundError:
            raise PocketVLMError("running GGUF artifacts needs llama-cpp-python: pip install 'pocketvlm[gguf]'") \
                from None

        self._llama, self._mtmd_lib = llama_cpp, mtmd
        ENGINE_LOG.install()
        start = time.perf_counter()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        ENGINE_LOG.clear()
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_file).encode(), params)
        if not self._model:
            raise ArtifactError(f"{self.model_file}: llama.cpp could not load the text model "
                                f"({ENGINE_LOG.errors() or 'no reason given'})")
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.context_length = self.processor.config.context_length
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

    def describe(self) -> dict:
        return {**super().describe(), "engine": f"llama-cpp-python {engine_version()} (llama.cpp + mtmd)",
                "threads": self.threads, "model": self.model_file.name, "mmproj": self.mmproj_file.name,
                "context": self._n_ctx, "decode_weight_bytes": self.decode_weight_bytes}

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

    def generate(self, request: Request, max_tokens: int, *, ignore_eos: bool = False,
                 with_logits: bool = False, force: Sequence[int] | None = None) -> Iterator[Step]:
        enc = self.processor.encode(request)
        ids = enc.input_ids
        steps = len(force) if force is not None else max_tokens
        stream = TextStream(self.processor)
        start = time.perf_counter()
        embeddings = []
        if enc.pixel_values is not None:
            for tile, mask in zip(enc.pixel_values[0], enc.pixel_attention_mask[0]):
                embeddings.append(self._encode_tile(self._tile_pixels(tile, mask)))
        encoded = time.perf_counter()
        segments = self._segments(ids, len(embeddings))
        self._ensure_context(min(self.context_length, len(ids) + steps))
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
        prefilled = time.perf_counter()
        memory = self._llama.llama_get_memory(self._ctx)
        self.last_prefill = Prefill(token_ids=fed, tiles=len(embeddings),
                                    n_past=self._llama.llama_memory_seq_pos_max(memory, 0) + 1)
        position = len(ids)
        for n in range(1, steps + 1):
            logits = self._logits()
            token = int(np.argmax(logits))
            first = n == 1
            yield Step(token_id=token, text=stream.push(token), time=time.perf_counter(),
                       logits=logits.astype(np.float32, copy=True) if with_logits else None,
                       encode_s=(encoded - start) if first and embeddings else None,
                       prefill_s=(prefilled - encoded) if first else None)
            fed = next_input(token, n, position, max_tokens=max_tokens, context=self.context_length,
                             eos=self.processor.eos_token_ids, ignore_eos=ignore_eos, force=force)
            if fed is None:
                return
            position += 1
            self._decode_tokens([fed])
