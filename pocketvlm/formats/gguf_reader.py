"""GGUF files read with gguf-py (llama.cpp's own reader, the `gguf` package, versioned with llama.cpp), and the
stricter checks pocketvlm adds on top before llama.cpp ever sees a file: cut short, of an unknown tensor type, of a
size that cannot exist, or a text model and an mmproj that do not belong together. Every failure is one line.

gguf-py is trusted for the format; what it does not check -- that every tensor's bytes lie inside the file, and
that every type id is one it knows the size of -- is checked here first, tensor by tensor, with the tensor named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, one_line

MAX_ARRAY_KEPT = 64  # longer metadata arrays (vocabularies) are not kept, only their length


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str          # as llama.cpp prints it: f16, q8_0, q4_K, ...
    n_elements: int
    nbytes: int


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
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bytes x 8 / parameters, over every tensor (as llama.cpp's quantizer reports BPW)."""
        return self.tensor_bytes * 8 / max(self.n_elements, 1)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def type_name(quant_type) -> str:
    """llama.cpp's spelling of a ggml type (gguf-py's enum names are upper case: Q4_K -> q4_K)."""
    name = quant_type.name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


def block_size(type_name_: str) -> int:
    """Elements per block of a ggml type, by llama.cpp's name (q8_0 -> 32, q4_K -> 256)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name_.upper()]][0]


class _Cut(Exception):
    def __init__(self, what: str, needed: int):
        super().__init__(what)
        self.what, self.needed = what, needed


class _Corrupt(Exception):
    pass


def _reader_class():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        """gguf-py's reader, refusing to read past the end of the file (it would silently return short arrays) and
        checking every tensor's type and extent before it maps the tensor's data."""

        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            end = int(offset) + int(np.empty([], dtype=dtype).itemsize) * count
            if count < 0 or end > self.data.nbytes:
                raise _Cut("its header runs past the end", end)
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            for f in fields:
                _, name_data, _, dims, raw_dtype, offset = f.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_dtype[0]))
                    block, size = GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError) as e:
                    raise _Corrupt(f"tensor {name} has unknown type id {int(raw_dtype[0])}; it was written by a "
                                   f"newer llama.cpp than this reader knows") from e
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                if n % block:
                    raise _Corrupt(f"tensor {name}: {n} elements do not fill whole {qtype.name} blocks of {block}")
                end = int(start_offs) + int(offset[0]) + n // block * size
                if end > self.data.nbytes:
                    raise _Cut(f"tensor {name} needs bytes up to {end}", end)
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def read_gguf(path: Path, what: str | None = None) -> GGUFInfo:
    """Header, metadata and tensor table of a GGUF file, checked for being complete. One-line ArtifactError if the
    file is missing, is not GGUF, is cut short or is corrupt."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    if not path.is_file():
        raise ArtifactError(f"{label}: no such file; re-export the artifact")
    size = path.stat().st_size
    if size == 0:
        raise ArtifactError(f"{label}: empty file (0 bytes); re-export the artifact")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ArtifactError(f"{label}: not a GGUF file (no GGUF magic); re-export the artifact")
    try:
        reader = _reader_class()(path)
    except _Cut as e:
        raise ArtifactError(f"{label}: truncated GGUF file ({size} bytes, {e.what}); re-export the artifact") from e
    except _Corrupt as e:
        raise ArtifactError(f"{label}: corrupt GGUF file ({e}); re-export the artifact") from e
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError) as e:
        # gguf-py's own refusals: bad version, bad alignment type, duplicate keys, unknown value types, ...
        raise ArtifactError(f"{label}: corrupt GGUF file ({one_line(e, 160)}); re-export the artifact") from e
    return _info(reader, path, size)


def _info(reader, path: Path, size: int) -> GGUFInfo:
    from gguf import GGUFValueType

    metadata, arrays = {}, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > MAX_ARRAY_KEPT:
            arrays[key] = len(f.data)
            continue
        try:
            metadata[key] = f.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise ArtifactError(f"{path}: corrupt GGUF file (metadata {key} unreadable); re-export the artifact") \
                from e
    tensors = [GGUFTensor(t.name, tuple(int(d) for d in t.shape.tolist()), type_name(t.tensor_type),
                          int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    version = int(reader.fields["GGUF.version"].parts[0][0])
    return GGUFInfo(path, version, metadata, tensors, int(reader.data_offset), size, arrays)


# ------------------------------------------------------------------------------------- the pair's checks

def decode_weight_bytes(info: GGUFInfo) -> int:
    """What one decode step reads from the text model: every tensor but the token embedding table (one row per
    step), unless the table doubles as the output head (no output.weight)."""
    tied = info.tensor("output.weight") is None
    return sum(t.nbytes for t in info.tensors if tied or t.name != "token_embd.weight")


def text_embedding_length(model: GGUFInfo) -> int | None:
    value = model.metadata.get(f"{model.architecture}.embedding_length")
    if value is None and (emb := model.tensor("token_embd.weight")) is not None:
        value = emb.shape[0]
    return int(value) if isinstance(value, (int, np.integer)) else None


def mmproj_projection_dim(mmproj: GGUFInfo) -> int | None:
    """What the projector outputs: the text model's embedding width it was built for."""
    fc = mmproj.tensor("mm.model.fc.weight")
    if fc is not None and len(fc.shape) >= 2:
        return int(fc.shape[1])
    value = mmproj.metadata.get("clip.vision.projection_dim")
    return int(value) if isinstance(value, (int, np.integer)) else None


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
