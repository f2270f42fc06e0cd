"""The shape of the package: every module imports on its own in a fresh interpreter, no import circles (counting the
imports inside functions too), torch only where it is needed, and every format declared once in the registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# top-level folder -> package it installs as (pyproject.toml's package-dir)
FOLDERS = {"pocketvlm": "pocketvlm", "export": "pocketvlm.export", "quantize": "pocketvlm.quantize",
           "runtime": "pocketvlm.runtime", "bench_device": "pocketvlm.bench_device", "samples": "pocketvlm.samples"}
# modules that must never load torch (the on-device paths and the shared core they use)
TORCH_FREE = ["pocketvlm.prompt", "pocketvlm.media", "pocketvlm.manifest", "pocketvlm.formats",
              "pocketvlm.formats.gguf_reader", "pocketvlm.runtime.gguf", "pocketvlm.runtime.onnx",
              "pocketvlm.runtime.mlx", "pocketvlm.runtime.coreml", "pocketvlm.runtime.server", "pocketvlm.cli",
              "pocketvlm.bench_device.cloud"]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "node_modules" in path.parts or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """pocketvlm modules NAME imports anywhere in its source (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # pocketvlm.x.attr -> pocketvlm.x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_no_import_circles():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # a module importing its own package's __init__ (e.g. `from . import base` in a package) is not a circle
    # unless __init__ imports it back; Tarjan's strongly connected components find every real one
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_graph_reader_sees_imports():
    """The circle test would pass vacuously if imports_of missed imports: check it on known edges."""
    mods = modules()
    edges = imports_of("pocketvlm.export.gguf", mods["pocketvlm.export.gguf"], set(mods))
    assert {"pocketvlm.formats.gguf_reader", "pocketvlm.quantize.gguf", "pocketvlm.manifest"} <= edges
    edges = imports_of("pocketvlm.runtime.onnx", mods["pocketvlm.runtime.onnx"], set(mods))
    assert {"pocketvlm.runtime.base", "pocketvlm.formats.onnx"} <= edges


@pytest.mark.parametrize("name", sorted(m for m in modules() if not m.endswith("__main__")))  # that one runs the CLI
def test_every_module_imports_alone(name):
    code = (f"import sys, importlib; importlib.import_module({name!r}); "
            f"print('torch' if sys.modules.get('torch') is not None else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if name in TORCH_FREE:
        assert proc.stdout.strip() == "no torch", f"{name} loads torch"


def test_every_format_is_declared_once_and_complete():
    from pocketvlm import formats

    mods = modules()
    for fmt in formats.DESCRIPTORS:
        stage = fmt.module or fmt.name
        assert f"pocketvlm.runtime.{stage}" in mods, fmt.name
        assert hasattr(fmt.stage("runtime"), fmt.backend), fmt.name
        if fmt.export_quants:
            assert f"pocketvlm.export.{stage}" in mods and hasattr(fmt.stage("export"), "export"), fmt.name
        if fmt.quantize_quants:
            assert f"pocketvlm.quantize.{stage}" in mods and hasattr(fmt.stage("quantize"), "quantize"), fmt.name
            assert set(fmt.quantize_quants) <= set(fmt.export_quants)
            assert set(fmt.quantize_from) <= set(fmt.export_quants)
    # nothing outside the registry keeps its own table of formats or quants
    for name, path in mods.items():
        if name.startswith("pocketvlm.formats"):
            continue
        text = path.read_text()
        for pattern in ('"q4_k_m")', '"fp32", "fp16", "int8", "q4"', '"fp16", "int8", "int4"', 'BACKENDS = {',
                        'QUANTS = (', 'RUNS_ONLY_ON'):
            assert pattern not in text, (name, pattern)


def test_error_messages_are_made_one_line_in_one_place():
    """Every user error is one line: modules pass exceptions through errors.one_line, which collapses newlines and
    cuts long engine messages, instead of each re-implementing (and drifting from) it."""
    from pocketvlm.errors import one_line

    assert one_line(ValueError("bad\n  shape\t(3,)")) == "bad shape (3,)"
    assert one_line(RuntimeError()) == "RuntimeError"  # never an empty reason
    assert one_line(OSError("x" * 50), 10) == "x" * 10 + "..."
    assert one_line("short", 10) == "short"
    for name, path in modules().items():
        if name != "pocketvlm.errors":
            assert "join(str(e).split())" not in path.read_text(), name
