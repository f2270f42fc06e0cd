"""Every format pocketvlm knows, declared once: its name, the pip extra that brings its engine, the quants export
and quantize make, the options its exporter takes, where its backend predicts, and where its stage code lives.

The CLI, the demo, export, quantize and the runtime all read this registry and nothing else. A format's own files:

    pocketvlm/formats/<name>.py   its descriptor (FORMAT) and its file layout, imported by its stages (no engine)
    export/<name>.py              export(source, out, quant, *, force, progress, **options) -> Path
    quantize/<name>.py            quantize(artifact, manifest, out, quant, *, force, progress) -> Path
    runtime/<name>.py             its Backend

Adding a format: write those files and add its descriptor to DESCRIPTORS below.
"""

from __future__ import annotations

from pocketvlm.errors import PocketVLMError

from .base import Format, Option  # noqa: F401  (the descriptor types)


def _descriptors() -> tuple[Format, ...]:
    from . import coreml, gguf, hf, mlx, onnx

    return (hf.FORMAT, coreml.FORMAT, gguf.FORMAT, mlx.FORMAT, onnx.FORMAT)


DESCRIPTORS = _descriptors()
FORMATS: dict[str, Format] = {f.name: f for f in DESCRIPTORS}
# the formats an export can produce (the reference "hf" is a source, not a target)
EXPORT_FORMATS: dict[str, Format] = {n: f for n, f in FORMATS.items() if f.export_quants}


def get(name: str, *, exportable: bool = False) -> Format:
    table = EXPORT_FORMATS if exportable else FORMATS
    if name not in table:
        raise PocketVLMError(f"unknown format {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def quant_help(kind: str = "export") -> str:
    """`gguf: f16 (default), q8_0, q4_k_m; mlx: ...` for --help, from the descriptors."""
    parts = []
    for f in sorted(EXPORT_FORMATS.values(), key=lambda f: f.name):
        quants = f.export_quants if kind == "export" else f.quantize_quants
        if not quants:
            continue
        names = [f"{q} (default)" if kind == "export" and q == f.default_quant else q for q in quants]
        parts.append(f"{f.name}: {', '.join(names)}")
    return "; ".join(parts)


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every exporter option, with the formats that take it (one --flag may serve several formats)."""
    options: dict[str, tuple[Option, list[str]]] = {}
    for f in sorted(EXPORT_FORMATS.values(), key=lambda f: f.name):
        for option in f.options:
            options.setdefault(option.name, (option, []))[1].append(f.name)
    return options
