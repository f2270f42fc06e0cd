"""GGUF (llama.cpp): a text-model GGUF and an mmproj GGUF (vision encoder + projector) from the same checkpoint,
plus the processor files. The file names, shared by export/gguf.py, quantize/gguf.py and runtime/gguf.py; the
reader is gguf_reader.py, llama.cpp's log capture llama_log.py."""

from __future__ import annotations

from pathlib import Path

from pocketvlm.errors import ArtifactError

from .base import Format, Option

MMPROJ_QUANTS = ("f16", "q8_0")


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
        Option("mmproj_quant", "gguf: vision projector type (default f16)", choices=MMPROJ_QUANTS),
    ),
)
