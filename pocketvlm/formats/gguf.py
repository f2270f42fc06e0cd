"""GGUF (llama.cpp): a text-model GGUF and an mmproj GGUF (vision encoder + projector) from the same checkpoint,
plus the processor files. The file names, shared by export/gguf.py, quantize/gguf.py and runtime/gguf.py; the
reader is gguf_reader.py, llama.cpp's log capture llama_log.py."""

from __future__ import annotations

from pathlib import Path

from pocketvlm.errors import ArtifactError

from .base import Format, Option

# The mmproj's (vision encoder + projector) weight types llama.cpp's converter writes and its clip loads. q8_0 is the
# default beside a quantized text model: at the 500M shape it is 90 MB smaller on disk and in peak RSS, with per-tile
# features at cosine 0.99983 to the reference; its encode time is not measurably different from f16's on a busy
# 2-core x86 (docs/BENCH.md "Vision encoders"). In q8_0 the converter keeps tensors whose rows do not divide into
# 32-value blocks in f16, and the patch/position embeddings and norms in f32.
VISION_QUANTS = ("f16", "q8_0")


def default_vision_quant(quant: str) -> str:
    return "f16" if quant == "f16" else "q8_0"


def model_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def mmproj_name(quant: str) -> str:
    return f"mmproj-{quant}.gguf"


def artifact_files(path: Path, manifest: dict | None) -> tuple[Path, Path]:
    """The text model and mmproj files of a GGUF artifact, as its manifest names them."""
    roles = (manifest or {}).get("gguf") or {}
    model = roles.get("model") if isinstance(roles, dict) else None
    mmproj = roles.get("mmproj") if isinstance(roles, dict) else None
    model = model if isinstance(model, str) else next((p.name for p in sorted(path.glob("model-*.gguf"))), None)
    mmproj = mmproj if isinstance(mmproj, str) else next((p.name for p in sorted(path.glob("mmproj-*.gguf"))), None)
    for name, what, pattern in ((model, "the text model GGUF", "model-*.gguf"),
                                (mmproj, "the mmproj GGUF", "mmproj-*.gguf")):
        if name is None or Path(name).name != name or not (path / name).is_file():
            extra = ", vision encoder + projector" if "mmproj" in pattern else ""
            raise ArtifactError(f"{path}: {what} ({name or pattern}{extra}) is missing; re-export the artifact")
    return path / model, path / mmproj


FORMAT = Format(
    name="gguf", adapters=True, title="GGUF (llama.cpp)", extra="gguf", backend="GGUFBackend",
    export_quants=("f16", "q8_0", "q4_k_m"), quantize_quants=("q8_0", "q4_k_m"), quantize_from=("f16",),
    options=(
        Option("llama_cpp_dir", "gguf: a llama.cpp checkout whose convert_hf_to_gguf.py to use (default: the one in "
                                "the installed llama-cpp-python's sdist; also POCKETVLM_LLAMA_CPP_DIR)",
               metavar="DIR"),
        Option("vision_quant", "gguf: weight type of the mmproj (vision encoder + projector): f16 or q8_0 "
                               "(default: q8_0 for q8_0 and q4_k_m exports, f16 for f16); --mmproj-quant is the "
                               "same option", choices=VISION_QUANTS, aliases=("mmproj_quant",)),
    ),
)
