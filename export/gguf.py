"""GGUF export: a SmolVLM2 checkpoint -> a llama.cpp text model GGUF + an mmproj GGUF (vision encoder + projector).

Both files come from llama.cpp's own converter, `convert_hf_to_gguf.py`, run with the `gguf-py` it ships beside
it. Nothing of llama.cpp is copied into this repository: the converter is taken at run time from the source
distribution of the *installed* llama-cpp-python version (so the files it writes are the ones that runtime reads),
downloaded once with pip into the user cache (`python -m pocketvlm.export.gguf fetch-converter` does only that),
or from a local llama.cpp checkout (`--llama-cpp-dir`, or POCKETVLM_LLAMA_CPP_DIR).

The text model is converted to f16 and, for q8_0 / q4_k_m, quantized with llama.cpp's own quantizer
(pocketvlm.quantize.gguf); the mmproj stays f16 (or q8_0 on request), since it is small and quantizing it costs
more than it saves.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pocketvlm.artifact import base_tools, copy_processor_files, set_image_size, source_record
from pocketvlm.errors import PocketVLMError, one_line
from pocketvlm.formats.gguf import (VISION_QUANTS, default_vision_quant, mmproj_name as mmproj_file,
                                   model_name as model_file)
from pocketvlm.formats.gguf_reader import check_pair, read_gguf
from pocketvlm.manifest import atomic_output, check_output, write_manifest
from pocketvlm.models import ModelSource

ENV_LLAMA_CPP_DIR = "POCKETVLM_LLAMA_CPP_DIR"
DISTRIBUTION = "llama-cpp-python"
# What the converter needs from the sdist's vendor/llama.cpp: the script, its model classes, its gguf-py.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# SmolLM2's pre-tokenizer (split digits one by one, then GPT-2 byte-level regex), as tokenizer.json states it.
PRETOKENIZER_FALLBACK_NOTE = "so writing tokenizer.ggml.pre = 'smollm'"
SMOLLM_PRETOKENIZER = [{"type": "Digits", "individual_digits": True},
                       {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]


# ------------------------------------------------------------------------------------------- the converter

@dataclass(frozen=True)
class Converter:
    root: Path    # folder holding convert_hf_to_gguf.py and gguf-py/
    origin: str   # where it came from, for the manifest

    @property
    def gguf_py_version(self) -> str | None:
        try:
            text = (self.root / "gguf-py" / "pyproject.toml").read_text()
        except OSError:
            return None
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return m.group(1) if m else None


def installed_llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError as e:
        raise PocketVLMError(f"the gguf format needs {DISTRIBUTION}, which is not installed: "
                             f"pip install 'pocketvlm[gguf]' (or pass --llama-cpp-dir for a llama.cpp checkout)") \
            from e


def converter_cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pocketvlm" / f"llama.cpp-{version}"


MODEL_CONVERTER, LORA_CONVERTER = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"


def _is_converter_dir(path: Path, scripts: tuple[str, ...] = (MODEL_CONVERTER, LORA_CONVERTER)) -> bool:
    # the cache must hold every script a stage runs (a cache made before the LoRA converter was kept is fetched
    # again); a user's checkout needs only the one the command runs (export_adapter checks for its own)
    return all((path / name).is_file() for name in scripts) and (path / "gguf-py" / "gguf" / "__init__.py").is_file()


def resolve_converter(llama_cpp_dir: str | Path | None = None, *, fetch: bool = True,
                      progress: bool = False) -> Converter:
    """The converter to use: --llama-cpp-dir, else $POCKETVLM_LLAMA_CPP_DIR, else the cached sdist copy
    (downloaded now if missing and `fetch`)."""
    given, how = (llama_cpp_dir, "--llama-cpp-dir") if llama_cpp_dir else \
        (os.environ.get(ENV_LLAMA_CPP_DIR), ENV_LLAMA_CPP_DIR)
    if given:
        root = Path(given).expanduser()
        if not root.is_dir():
            raise PocketVLMError(f"{how} {root}: no such folder; point it at a llama.cpp checkout")
        if not _is_converter_dir(root, (MODEL_CONVERTER,)):
            raise PocketVLMError(f"{how} {root} has no convert_hf_to_gguf.py with gguf-py/ beside it; "
                                 f"point it at a llama.cpp checkout (or drop it to use the installed "
                                 f"{DISTRIBUTION}'s own converter)")
        rev = _git_revision(root)
        return Converter(root.resolve(), f"llama.cpp checkout {root.resolve()}" + (f" ({rev})" if rev else ""))
    version = installed_llama_cpp_version()
    cache = converter_cache_dir(version)
    if not _is_converter_dir(cache):
        if not fetch:
            raise PocketVLMError(f"llama.cpp's converter for {DISTRIBUTION} {version} is not in {cache}; "
                                 f"run `python -m pocketvlm.export.gguf fetch-converter`")
        fetch_converter(version, progress=progress)
    return Converter(cache, f"convert_hf_to_gguf.py from the {DISTRIBUTION} {version} sdist")


def _git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def fetch_converter(version: str | None = None, *, progress: bool = True) -> Path:
    """Download the llama-cpp-python sdist of `version` (default: the installed one) with pip, once, and keep
    only llama.cpp's converter and gguf-py from it in the user cache. Returns the cache folder."""
    version = version or installed_llama_cpp_version()
    cache = converter_cache_dir(version)
    if _is_converter_dir(cache):
        return cache
    fix = (f"connect to the package index once and run `python -m pocketvlm.export.gguf fetch-converter`, "
           f"or pass --llama-cpp-dir (or set {ENV_LLAMA_CPP_DIR}) to a llama.cpp checkout")
    if progress:
        print(f"fetching llama.cpp's converter: pip download {DISTRIBUTION}=={version} (sdist, once) ...",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pocketvlm-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{DISTRIBUTION}=={version}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as e:
            raise PocketVLMError(f"could not run pip to fetch llama.cpp's converter ({e.__class__.__name__}); "
                                 f"{fix}") from e
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            reason = _last_line(proc.stderr + proc.stdout) or f"pip exited {proc.returncode}"
            raise PocketVLMError(f"could not download the {DISTRIBUTION} {version} source distribution that "
                                 f"holds llama.cpp's converter ({reason}); {fix}")
        install_converter(sdists[0], cache, version)
    if progress:
        print(f"llama.cpp converter cached in {cache}", file=sys.stderr)
    return cache


def install_converter(sdist: Path, cache: Path, version: str) -> None:
    """Extract the converter from `sdist` into `cache` atomically: a partial folder renamed into place, a stale
    cache (an older pocketvlm kept fewer scripts) set aside and replaced whole, a concurrent fetch tolerated."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.parent / f"{cache.name}.partial-{secrets.token_hex(4)}"
    stale = None
    try:
        _extract_converter(sdist, partial)
        (partial / "pocketvlm-source.json").write_text(json.dumps(
            {"distribution": DISTRIBUTION, "version": version, "sdist": sdist.name}, indent=2) + "\n")
        if cache.exists() and not _is_converter_dir(cache):
            # a cache from an older pocketvlm (kept fewer scripts): set aside, replaced whole, then removed
            stale = cache.parent / f"{cache.name}.stale-{secrets.token_hex(4)}"
            try:
                cache.rename(stale)
            except OSError:
                stale = None  # a concurrent fetch moved it first
        try:
            partial.rename(cache)
        except OSError as e:
            if not _is_converter_dir(cache):  # not a concurrent fetch that won the race
                raise PocketVLMError(f"could not put llama.cpp's converter in {cache} "
                                     f"({e.strerror or e.__class__.__name__}); remove that folder and retry") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _extract_converter(sdist: Path, dest: Path) -> None:
    try:
        with tarfile.open(sdist) as tar:
            prefix = next((m.name.split("/vendor/llama.cpp/")[0] + "/vendor/llama.cpp/" for m in tar
                           if "/vendor/llama.cpp/convert_hf_to_gguf.py" in m.name), None)
            if prefix is None:
                raise PocketVLMError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py; this "
                                     f"{DISTRIBUTION} release cannot export GGUF here; pass --llama-cpp-dir")
            wanted = [m for m in tar.getmembers() if m.name.startswith(prefix)
                      and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS]
            for m in wanted:
                m.name = m.name[len(prefix):]
            dest.mkdir(parents=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=wanted, filter="data")
            else:  # Python without extraction filters: refuse anything that is not a plain file or folder
                safe = [m for m in wanted if (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts
                        and not m.name.startswith("/")]
                tar.extractall(dest, members=safe)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PocketVLMError(f"{sdist.name}: unreadable source distribution ({e.__class__.__name__}); "
                             f"run `python -m pocketvlm.export.gguf fetch-converter` again") from e
    if not _is_converter_dir(dest):
        raise PocketVLMError(f"{sdist.name}: the converter or its gguf-py is missing from the source distribution")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|exception|failed", line, re.I)]
    return ((errors or lines or [""])[-1])[:240]


def run_converter(converter: Converter, model_dir: Path, outfile: Path, outtype: str, *, mmproj: bool) -> str:
    """Run convert_hf_to_gguf.py in a subprocess (its own sys.path, its own gguf-py). Returns its log."""
    cmd = [sys.executable, "-m", "pocketvlm.export.gguf", "run-converter", str(converter.root), "--",
           str(model_dir), "--outfile", str(outfile), "--outtype", outtype, *(["--mmproj"] if mmproj else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    what = "mmproj (vision encoder + projector)" if mmproj else "text model"
    if proc.returncode != 0 or not outfile.is_file():
        marker = re.search(r"pocketvlm-converter-error: (.*)", proc.stderr)
        reason = marker.group(1) if marker else (_last_line(proc.stderr) or f"exit {proc.returncode}")
        raise PocketVLMError(f"llama.cpp's converter failed on the {what} of {model_dir}: {reason}")
    return proc.stderr


def _converter_main(root: Path, argv: list[str]) -> int:
    """Inside the converter subprocess: import the converter with its own gguf-py, teach it SmolLM2's
    pre-tokenizer for locally trained tokenizers, and run its main()."""
    root = Path(root).resolve()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import convert_hf_to_gguf as convert  # noqa: E402  (the module; its main() only runs when called)

    base = sys.modules.get("conversion.base", convert)  # split layout (conversion/) or one big script
    text_model = getattr(base, "TextModel", None)
    if text_model is not None and hasattr(text_model, "get_vocab_base_pre"):
        original = text_model.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            # The converter names a BPE pre-tokenizer by hashing how it splits a test string; published
            # checkpoints are in its table. A tokenizer trained here is not, but if it declares exactly SmolLM2's
            # pre-tokenizer, llama.cpp's "smollm" is the same splitting. Anything else still fails loudly.
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                if _declares_smollm_pretokenizer(Path(self.dir_model) / "tokenizer.json"):
                    print("pocketvlm: BPE pre-tokenizer hash unknown to the converter; tokenizer.json declares "
                          f"SmolLM2's (digits + byte-level), {PRETOKENIZER_FALLBACK_NOTE}", file=sys.stderr)
                    return "smollm"
                print("pocketvlm-converter-error: the tokenizer's BPE pre-tokenizer is unknown to llama.cpp's "
                      "converter and is not SmolLM2's", file=sys.stderr)
                raise

        text_model.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *argv]
    result = convert.main()
    return int(result or 0)


def _declares_smollm_pretokenizer(tokenizer_json: Path) -> bool:
    try:
        pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != len(SMOLLM_PRETOKENIZER):
        return False
    return all(isinstance(step, dict) and all(step.get(k) == v for k, v in want.items())
               for step, want in zip(steps, SMOLLM_PRETOKENIZER))


# ------------------------------------------------------------------------------------------------ export

def export(source: ModelSource, out: Path, quant: str, *, force: bool, progress: bool,
           image_size: int | None = None, llama_cpp_dir: str | None = None, vision_quant: str | None = None) -> Path:
    from pocketvlm.quantize import gguf as gguf_quant

    mmproj_quant = vision_quant or default_vision_quant(quant)
    if mmproj_quant not in VISION_QUANTS:
        raise PocketVLMError(f"unknown --vision-quant {mmproj_quant!r}; choose one of: {', '.join(VISION_QUANTS)}")
    check_output(out, force=force)  # before a possibly long converter download
    converter = resolve_converter(llama_cpp_dir, progress=progress)

    def say(message):
        if progress:
            print(message, file=sys.stderr, flush=True)

    model_name, mmproj_name = model_file(quant), mmproj_file(mmproj_quant)
    timings = {}
    with atomic_output(out, force=force) as tmp:
        start = time.perf_counter()
        say(f"converting the text model to f16 with llama.cpp's converter ({converter.origin}) ...")
        f16 = tmp / "model-f16.gguf"
        log = run_converter(converter, source.path, f16, "f16", mmproj=False)
        timings["convert_text_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        say(f"converting the vision encoder + projector to {mmproj_quant} ...")
        run_converter(converter, source.path, tmp / mmproj_name, mmproj_quant, mmproj=True)
        timings["convert_mmproj_s"] = round(time.perf_counter() - start, 2)
        report = None
        if quant != "f16":
            start = time.perf_counter()
            say(f"quantizing the text model to {quant} with llama.cpp's quantizer ...")
            report = gguf_quant.quantize_file(f16, tmp / model_name, quant)
            f16.unlink()
            timings["quantize_s"] = round(time.perf_counter() - start, 2)
            gguf_quant.print_report(report, progress=progress)
        model_info, mmproj_info = read_gguf(tmp / model_name), read_gguf(tmp / mmproj_name)
        check_pair(model_info, mmproj_info)
        copy_processor_files(source.path, tmp)
        budget = set_image_size(tmp, image_size)
        bpw = report["bits_per_weight"] if report else model_info.bits_per_weight
        write_manifest(
            tmp, format="gguf", quant=quant, source=source_record(source),
            tools={**base_tools(), **gguf_quant.engine_tools(), "converter": converter.origin,
                   **({"gguf-py": converter.gguf_py_version} if converter.gguf_py_version else {})},
            gguf={"model": model_name, "mmproj": mmproj_name, "mmproj_quant": mmproj_quant,
                  "pre_tokenizer_fallback": "smollm" if PRETOKENIZER_FALLBACK_NOTE in log else None,
                  "bits_per_weight": round(bpw, 3), "timings": timings},
            **({"quantization": report} if report else {}), **budget,
        )
    say(f"text model {model_name}: {model_info.size / 2**20:.1f} MiB, {bpw:.2f} bits/weight; "
        f"{mmproj_name}: {mmproj_info.size / 2**20:.1f} MiB")
    return out


# ------------------------------------------------------------------------------------------ LoRA adapters

def _lora_converter_main(root: Path, argv: list[str]) -> int:
    """Inside the converter subprocess: llama.cpp's convert_lora_to_gguf.py with its own gguf-py."""
    import runpy

    root = Path(root).resolve()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    sys.argv = [str(root / "convert_lora_to_gguf.py"), *argv]
    runpy.run_path(str(root / "convert_lora_to_gguf.py"), run_name="__main__")
    return 0


def export_adapter(adapter, base: Path, out: Path, *, force: bool, progress: bool,
                   llama_cpp_dir: str | None = None) -> Path:
    """A peft LoRA adapter -> adapter.gguf (llama.cpp's convert_lora_to_gguf.py: only the base's config.json is
    read, the Hub never), for `ask BASE --adapter OUT`. llama.cpp applies LoRA to the text model only (mtmd's
    vision encoder takes none), so a vision or connector adapter is refused rather than half-applied."""
    from pocketvlm.adapters import adapter_record

    skipped = adapter.parts() & {"vision", "connector"}
    if skipped:
        raise PocketVLMError(f"{adapter.path} adapts the {' and '.join(sorted(skipped))} too; llama.cpp applies LoRA "
                             f"to the text model only and would drop those silently: export the merged model "
                             f"instead (pocketvlm export {adapter.path.parent} --to gguf), or an adapter trained "
                             f"with --target text")
    check_output(out, force=force)
    converter = resolve_converter(llama_cpp_dir, progress=progress)
    if not (converter.root / LORA_CONVERTER).is_file():
        raise PocketVLMError(f"{converter.origin} has no {LORA_CONVERTER}; point --llama-cpp-dir at a llama.cpp "
                             f"checkout that has it (or drop it to use the installed {DISTRIBUTION}'s own)")
    with atomic_output(out, force=force) as tmp:
        if progress:
            print(f"converting the LoRA adapter with llama.cpp's convert_lora_to_gguf.py ({converter.origin}) ...",
                  file=sys.stderr, flush=True)
        target = tmp / "adapter.gguf"
        cmd = [sys.executable, "-m", "pocketvlm.export.gguf", "run-lora-converter", str(converter.root), "--",
               str(adapter.path), "--base", str(base), "--outfile", str(target), "--outtype", "f32"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            raise PocketVLMError(f"llama.cpp's LoRA converter failed on {adapter.path}: "
                                 f"{_last_line(proc.stderr) or f'exit {proc.returncode}'}")
        info = read_gguf(target, "LoRA adapter")
        if info.metadata.get("general.type") != "adapter":
            raise PocketVLMError(f"llama.cpp's LoRA converter wrote {target.name} without general.type = adapter")
        write_manifest(tmp, format="gguf", quant="f32", source={"id": str(adapter.path), "revision": None,
                                                                  "path": str(adapter.path)},
                       tools={**base_tools(), "converter": converter.origin},
                       adapter={**adapter_record(adapter, "gguf"), "file": target.name,
                                "tensors": len(info.tensors)})
    if progress:
        print(f"adapter {target.name}: {len(info.tensors)} tensors, rank {adapter.rank}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------- commands

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-converter"] and len(argv) >= 3 and argv[2] == "--":
        return _converter_main(Path(argv[1]), argv[3:])
    if argv[:1] == ["run-lora-converter"] and len(argv) >= 3 and argv[2] == "--":
        return _lora_converter_main(Path(argv[1]), argv[3:])
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pocketvlm.export.gguf",
                                     description="GGUF export helpers (the export itself is `pocketvlm export`).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch-converter", help="download llama.cpp's converter for the installed "
                                               f"{DISTRIBUTION} into the user cache (once) and print its folder")
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(fetch_converter(progress=not args.quiet))
    except PocketVLMError as e:
        print(f"pocketvlm: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
