"""GGUF quantization: an f16 text model GGUF -> q8_0 / q4_k_m with llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`). An f16 mmproj is re-quantized to q8_0 with gguf-py (requantize_mmproj), the default a q8_0 or
q4_k_m export gives it.

llama.cpp quantizes a matrix to a block type only when its rows divide into whole blocks (32 values for q8_0 and
q5_0, 256 for the k-quants); other tensors fall back to a type whose blocks fit (q4_K -> q5_0, q6_K -> q8_0, ...).
At SmolVLM2's widths (576, 960) most of a "q4_k_m" model is therefore q5_0/q8_0. The report says which tensors fell
back and the effective bits per weight, is stored in the manifest, and warns when most of the model is not the
type that was asked for.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import sys
from pathlib import Path

from pocketvlm.artifact import base_tools, copy_processor_files, inherited
from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.formats.gguf import FORMAT, artifact_files, default_vision_quant, mmproj_name, model_name
from pocketvlm.formats.gguf_reader import block_size, check_pair, read_gguf
from pocketvlm.formats.llama_log import ENGINE_LOG, default_threads, engine_version
from pocketvlm.manifest import atomic_output, write_manifest

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
TARGET_TYPE = {"q8_0": "q8_0", "q4_k_m": "q4_K"}  # the block type the name promises for the bulk of the weights

_FALLBACK_LINE = re.compile(
    r"warning:\s+(?P<name>\S+)\s+-\s+ncols\s+(?P<ncols>\d+)\s+not divisible by\s+(?P<block>\d+)\s+"
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING:[^)]*\)\s*)?->\s*falling back to\s+(?P<got>\S+)")
_FALLBACK_TOTAL = re.compile(r"WARNING:\s+(\d+)\s+of\s+(\d+)\s+tensor\(s\) required fallback quantization")


def engine_tools() -> dict:
    try:
        return {"llama-cpp-python": engine_version()}
    except Exception:
        return {}


def quantize_file(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> dict:
    """Quantize the text model GGUF `src` into `dst`; the tensor report (see tensor_report)."""
    FORMAT.check_quant(quant, quantize=True)
    info = read_gguf(src, "text model")
    if info.architecture in (None, "clip"):
        raise ArtifactError(f"{src}: not a text model GGUF (architecture {info.architecture!r})")
    try:
        import llama_cpp
    except ModuleNotFoundError as e:
        raise PocketVLMError("quantizing GGUF needs llama-cpp-python: pip install 'pocketvlm[gguf]'") from e
    ENGINE_LOG.install()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = threads or default_threads()
    ENGINE_LOG.clear()
    with ENGINE_LOG.capture() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise PocketVLMError(f"llama.cpp could not quantize {Path(src).name} to {quant} "
                             f"({ENGINE_LOG.errors() or f'code {rc}'})")
    return tensor_report(read_gguf(dst, "quantized text model"), quant, "".join(lines))


def tensor_report(info, quant: str, log: str = "") -> dict:
    """Tensor types of a quantized text model, the tensors that fell back from the requested block type (from
    llama.cpp's own log where it gives them, else from the shapes), and the effective bits per weight."""
    target = TARGET_TYPE[quant]
    fallbacks = [{"tensor": m["name"], "columns": int(m["ncols"]), "wanted": m["wanted"], "got": m["got"]}
                 for m in _FALLBACK_LINE.finditer(log)]
    total = _FALLBACK_TOTAL.search(log)
    if (total and int(total.group(1)) != len(fallbacks)) or not log:
        # No per-tensor lines to read: the matrices whose rows do not divide into the target's blocks.
        block = block_size(target)
        fallbacks = [{"tensor": t.name, "columns": t.shape[0], "wanted": target, "got": t.type_name}
                     for t in info.tensors if len(t.shape) >= 2 and t.shape[0] % block and t.type_name != target]
    matrices = [t for t in info.tensors if len(t.shape) >= 2]
    by_got: dict[str, int] = {}
    for f in fallbacks:
        by_got[f["got"]] = by_got.get(f["got"], 0) + 1
    report = {
        "requested": quant,
        "target_type": target,
        "tensors": len(info.tensors),
        "matrices": len(matrices),
        "types": info.type_counts(),
        "on_target": sum(t.type_name == target for t in matrices),
        "n_fallback": len(fallbacks),
        "fallback_types": by_got,
        "fallbacks": fallbacks,
        "bits_per_weight": round(info.bits_per_weight, 3),
        "bytes": info.size,
    }
    if len(fallbacks) * 2 > len(matrices):
        widths = sorted({f["columns"] for f in fallbacks})
        report["warning"] = (
            f"{quant} is mostly not {target}: {len(fallbacks)} of {len(matrices)} weight matrices have rows "
            f"({', '.join(map(str, widths[:4]))}{', ...' if len(widths) > 4 else ''} values) that do not divide into "
            f"{target} blocks and fell back to {', '.join(f'{k} ({v})' for k, v in by_got.items())}; "
            f"effective {report['bits_per_weight']:.2f} bits/weight")
    return report


def print_report(report: dict, *, progress: bool = True) -> None:
    """One summary line (unless quiet); the warning, if any, always."""
    if progress:
        fb = ", ".join(f"{k}: {v}" for k, v in report["fallback_types"].items()) or "none"
        print(f"{report['requested']}: {report['on_target']} of {report['matrices']} weight matrices are "
              f"{report['target_type']}; {report['n_fallback']} fell back ({fb}); "
              f"{report['bits_per_weight']:.2f} bits/weight, {report['bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    if report.get("warning"):
        print(f"pocketvlm: warning: {report['warning']}", file=sys.stderr)


def requantize_mmproj(src: Path, dst: Path) -> dict:
    """An f16 mmproj -> q8_0, with gguf-py, by the rule llama.cpp's converter applies with `--outtype q8_0
    --mmproj`: every tensor it would have written f16 under `--outtype f16` (2-D weights; embeddings, norms and
    biases are f32 in both) becomes q8_0 where its rows divide into 32-value blocks and stays f16 where they do
    not. Values go f16 -> q8_0 here instead of checkpoint -> q8_0: identical for a bf16 checkpoint (every bf16
    weight of normal magnitude is exact in f16), within f16 rounding before quantization for an fp32 one. Returns
    the tensor types written."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(dst, str(arch.contents()) if arch else "clip")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    types: dict[str, int] = {}
    for t in reader.tensors:
        data, kind = np.asarray(t.data), t.tensor_type
        if kind == gguf.GGMLQuantizationType.F16 and data.ndim >= 2 and data.shape[-1] % block == 0:
            data, kind = gguf.quants.quantize(data.astype(np.float32), q8), q8
        writer.add_tensor(t.name, data, raw_dtype=kind)
        types[kind.name.lower()] = types.get(kind.name.lower(), 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path:
    """`pocketvlm quantize`: an f16 GGUF artifact -> a q8_0 / q4_k_m artifact; its f16 mmproj becomes q8_0, as the
    export of that quant makes it (default_vision_quant), and a q8_0 one is carried over."""
    artifact = Path(artifact)
    model, mmproj = artifact_files(artifact, manifest)
    check_pair(read_gguf(model, "text model"), read_gguf(mmproj, "mmproj"))
    roles = {k: v for k, v in (manifest.get("gguf") or {}).items() if k != "timings"}
    name = model_name(quant)
    vision = default_vision_quant(quant)
    was = roles.get("mmproj_quant") or mmproj.stem.removeprefix("mmproj-")
    with atomic_output(out, force=force) as tmp:
        if progress:
            print(f"quantizing {model.name} to {quant} with llama.cpp's quantizer ...", file=sys.stderr, flush=True)
        report = quantize_file(model, tmp / name, quant)
        if was == "f16" and vision == "q8_0":
            if progress:
                print(f"quantizing {mmproj.name} (vision encoder + projector) to q8_0 ...", file=sys.stderr,
                      flush=True)
            new_mmproj = mmproj_name("q8_0")
            requantize_mmproj(mmproj, tmp / new_mmproj)
        else:
            new_mmproj, vision = mmproj.name, was
            shutil.copy2(mmproj, tmp / new_mmproj)
        copy_processor_files(artifact, tmp)
        check_pair(read_gguf(tmp / name), read_gguf(tmp / new_mmproj))
        tools = {**manifest.get("tools", {}), **base_tools(), **engine_tools()}
        write_manifest(
            tmp, format="gguf", quant=quant, source=manifest.get("source", {}), tools=tools,
            gguf={**roles, "model": name, "mmproj": new_mmproj, "mmproj_quant": vision,
                  "bits_per_weight": report["bits_per_weight"], "quantized_from": str(artifact.resolve())},
            quantization=report, **inherited(manifest),
        )
    print_report(report, progress=progress)
    return Path(out)
