"""Export: a SmolVLM2 checkpoint -> an artifact folder (one module per format: gguf.py, mlx.py, onnx.py, coreml.py).

Each format module provides
    QUANTS: tuple[str, ...]                  the --quant names it accepts, default first
    OPTIONS: dict[str, str]                  the format-specific options it accepts (name -> help)
    export(source: ModelSource, out: Path, quant: str, *, force: bool, progress: bool, **options) -> Path
and writes through pocketvlm.manifest.atomic_output, the manifest last. Modules are imported only when used, so a
missing optional dependency only matters for its own format.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from pocketvlm import __version__
from pocketvlm.errors import PocketVLMError
from pocketvlm.manifest import sha256_quick
from pocketvlm.models import ModelSource, resolve_source

# format -> (module, pip extra that provides its engine)
FORMATS = {
    "coreml": ("pocketvlm.export.coreml", "coreml"),
    "gguf": ("pocketvlm.export.gguf", "gguf"),
    "mlx": ("pocketvlm.export.mlx", "mlx"),
    "onnx": ("pocketvlm.export.onnx", "onnx"),
}

# Everything a Processor (pocketvlm.prompt) reads, carried into artifacts that keep the Hugging Face layout.
PROCESSOR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "special_tokens_map.json")


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise PocketVLMError(f"unknown format {fmt!r}; choose one of: {', '.join(sorted(FORMATS))}")
    module_name, extra = FORMATS[fmt]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("pocketvlm"):
            raise
        raise PocketVLMError(f"the {fmt} format needs {e.name!r}, which is not installed: "
                             f"pip install 'pocketvlm[{extra}]'") from None


def export_model(source: str, fmt: str, out: Path, *, quant: str | None = None, force: bool = False,
                 progress: bool = True, **options) -> Path:
    """Resolve SOURCE, check the options against the format, and run its exporter."""
    module = format_module(fmt)
    quant = quant or module.QUANTS[0]
    if quant not in module.QUANTS:
        raise PocketVLMError(f"unknown --quant {quant!r} for {fmt}; choose one of: {', '.join(module.QUANTS)}")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(module.OPTIONS))
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise PocketVLMError(f"{names} does not apply to {fmt} exports")
    src = resolve_source(source)
    if Path(out).resolve() == src.path:
        raise PocketVLMError(f"--out {out} is the source folder itself")
    return module.export(src, Path(out), quant, force=force, progress=progress, **given)


def source_record(src: ModelSource) -> dict:
    """What the manifest says about where an artifact came from: enough to find the reference again."""
    weights = next((src.path / w for w in ("model.safetensors", "model.safetensors.index.json")
                    if (src.path / w).is_file()), None)
    return {"id": src.id, "revision": src.revision, "path": str(src.path),
            "sha256": sha256_quick(weights) if weights else None}


def copy_processor_files(src: Path, dst: Path) -> None:
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def base_tools() -> dict:
    return {"pocketvlm": __version__}
