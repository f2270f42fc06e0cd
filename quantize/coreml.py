"""Core ML quantization: compress the weights of an fp16 Core ML artifact's two packages with coremltools.optimize.

    int8  linear symmetric, per output channel          (constexpr_blockwise_shift_scale, 8-bit)
    int4  linear symmetric, per block of 32 input values (constexpr_blockwise_shift_scale, 4-bit; iOS 18 ops);
          the vision patch convolution (3 input channels: no block of 32 fits) goes 8-bit per channel instead
          of staying fp16
    palettize (not a --quant; compress_folder(..., palettize=True)): 4-bit k-means look-up tables per 16 output
          channels (constexpr_lut_to_dense); slow (k-means on every weight), kept for experiments. Not offered:
          a 4-bit palettized stateful model is what crashes on the Neural Engine under coremltools 9.0
          (apple/coremltools#2716; pocketvlm.formats.coreml.COMPUTE_UNITS).

Compression works on the saved ML Program, so it runs on Linux; the weights a Mac will run are exactly the
decompressed ones (coremltools' decompress_weights), which is how tests measure their drift.
Also: describe(), the spec summary the manifest carries (inputs, outputs, states, ranges, spec version, op counts,
weight bytes).
"""

from __future__ import annotations

import collections
import shutil
import sys
import time
from pathlib import Path

from pocketvlm.artifact import base_tools, inherited, note as log
from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.formats.coreml import (DECODER, EMBEDDINGS, FORMAT, PACKAGES, compute_units, compute_units_note,
                                      import_coremltools, quiet)
from pocketvlm.manifest import FILENAME, atomic_output, write_manifest

BLOCK_SIZE = 32
WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller constants (norms, biases) stay fp16
COMPRESSION_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_affine_dequantize")


def config(quant: str, *, palettize: bool = False, conv_weights: tuple[str, ...] = ()):
    """The coremltools.optimize config of a quant. conv_weights: names of the convolution weight constants (the
    vision patch embedding), which int4 compresses 8-bit per channel (3 input channels: no block of 32 fits). They
    are named one by one: a per-op-type config would conflict with other users of the shared bias constant."""
    import coremltools.optimize.coreml as cto

    if palettize:
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=4 if quant == "int4" else 8,
                                    granularity="per_grouped_channel", group_size=16,
                                    weight_threshold=WEIGHT_THRESHOLD)
        return cto.OptimizationConfig(global_config=op)
    if quant == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=WEIGHT_THRESHOLD)
        return cto.OptimizationConfig(global_config=op)
    if quant == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=BLOCK_SIZE, weight_threshold=WEIGHT_THRESHOLD)
        conv = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=WEIGHT_THRESHOLD)
        return cto.OptimizationConfig(global_config=op, op_name_configs={name: conv for name in conv_weights})
    raise PocketVLMError(f"unknown --quant {quant!r} for coreml; choose one of: "
                         f"{', '.join(FORMAT.quantize_quants)}")


def conv_weight_names(model) -> tuple[str, ...]:
    import coremltools.optimize.coreml as cto

    meta = cto.get_weights_metadata(model, weight_threshold=WEIGHT_THRESHOLD)
    return tuple(name for name, m in meta.items()
                 if m.child_ops and all(c.op_type == "conv" for c in m.child_ops))


def compress_package(src: Path, dst: Path, quant: str, *, palettize: bool = False) -> None:
    """SRC.mlpackage (fp16) -> DST.mlpackage with compressed weights."""
    import coremltools.optimize.coreml as cto

    ct = import_coremltools()
    with quiet():
        model = ct.models.MLModel(str(src), skip_model_load=True)
        fn = cto.palettize_weights if palettize else cto.linear_quantize_weights
        convs = conv_weight_names(model) if quant == "int4" and not palettize else ()
        compressed = fn(model, config(quant, palettize=palettize, conv_weights=convs))
    compressed.save(str(dst))


def compress_folder(folder: Path, quant: str, *, progress: bool, palettize: bool = False) -> dict:
    """Replace both packages in FOLDER by their compressed versions; returns what the manifest records."""
    for name in PACKAGES:
        start = time.perf_counter()
        src = Path(folder) / name
        tmp = Path(folder) / f".{quant}-{name}"
        log(progress, f"compressing {name} to {quant} ...")
        compress_package(src, tmp, quant, palettize=palettize)
        shutil.rmtree(src)
        tmp.rename(src)
        log(progress, f"compressed {name} in {time.perf_counter() - start:.1f}s")
    if palettize:
        nbits = 4 if quant == "int4" else 8
        return {"method": "palettize_kmeans", "nbits": nbits, "granularity": "per_grouped_channel",
                "group_size": 16, "weight_threshold": WEIGHT_THRESHOLD, "vision": f"palettized {nbits}-bit"}
    return compress_folder_info(quant)


# ------------------------------------------------------------------------------------------- spec summary

def load_spec(path: Path):
    ct = import_coremltools()
    try:
        with quiet():
            return ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as e:  # protobuf / file errors, as one line
        raise ArtifactError(f"{path}: not a readable Core ML package ({type(e).__name__}); re-export it") from e


def _feature(f) -> dict:
    from coremltools.proto import FeatureTypes_pb2 as ft

    kind = f.type.WhichOneof("Type")
    if kind == "stateType":
        a = f.type.stateType.arrayType
        return {"dtype": ft.ArrayFeatureType.ArrayDataType.Name(a.dataType), "shape": list(a.shape)}
    if kind != "multiArrayType":
        return {"type": kind}
    a = f.type.multiArrayType
    d = {"dtype": ft.ArrayFeatureType.ArrayDataType.Name(a.dataType), "shape": list(a.shape)}
    if a.HasField("shapeRange"):
        d["ranges"] = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
    if a.HasField("enumeratedShapes"):
        d["enumerated"] = [list(s.shape) for s in a.enumeratedShapes.shapes]
    return d


def op_counts(spec) -> dict:
    counts = collections.Counter()

    def walk(block):
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return dict(sorted(counts.items()))


def describe(path: Path) -> dict:
    """inputs / outputs / states (dtype, shape, ranges), spec version, op counts, weight bytes of one package."""
    spec = load_spec(path)
    d = spec.description
    weights = Path(path) / "Data" / "com.apple.CoreML" / "weights"
    return {
        "spec_version": spec.specificationVersion,
        "inputs": {f.name: _feature(f) for f in d.input},
        "outputs": {f.name: _feature(f) for f in d.output},
        "states": {f.name: _feature(f) for f in d.state},
        "ops": op_counts(spec),
        "weight_bytes": sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0,
    }


def tools(ct) -> dict:
    import torch
    import transformers

    return {**base_tools(), "coremltools": ct.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def finish(folder: Path, quant: str, *, source: dict, ct, quantization: dict | None, **extra) -> dict:
    """Shared last step of export and quantize: the spec summary of both packages, then the manifest."""
    spec = {name: describe(folder / name) for name in PACKAGES}
    return write_manifest(folder, format="coreml", quant=quant, source=source, tools=tools(ct),
                          coreml={"packages": spec, "embeddings": EMBEDDINGS,
                                  "max_context": spec[DECODER]["states"]["k_cache"]["shape"][3],
                                  "compute_precision": "fp16", "compute_units": compute_units(quant)},
                          quantization=quantization or {"weights": "fp16", "vision": "fp16"}, **extra)


def announce(quant: str) -> None:
    """The compute-units note of a QUANT artifact (int4: not the Neural Engine), printed by export and quantize
    even with --quiet: it is about what the user gets, not progress."""
    note = compute_units_note(quant)
    if note:
        print(f"pocketvlm: note: {note}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- quantize

def quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path:
    """int8 / int4 from an fp16 Core ML artifact (the packages are compressed, everything else is copied)."""
    artifact = Path(artifact)
    ct = import_coremltools()
    with atomic_output(out, force=force) as scratch:
        for entry in artifact.iterdir():
            if entry.name == FILENAME or entry.name in PACKAGES:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, scratch / entry.name)
        start = time.perf_counter()
        for name in PACKAGES:
            log(progress, f"compressing {name} to {quant} ...")
            compress_package(artifact / name, scratch / name, quant)
        finish(scratch, quant, source=manifest["source"], ct=ct, quantization=compress_folder_info(quant),
               export_s={quant: round(time.perf_counter() - start, 2)},
               deployment_target=manifest.get("deployment_target", "iOS18"),
               derived_from={"path": str(artifact), "quant": manifest["quant"]}, **inherited(manifest))
    announce(quant)
    return out


def compress_folder_info(quant: str) -> dict:
    """The manifest's quantization record. Both packages are compressed alike, so the vision encoder is what the
    text decoder is (its patch convolution 8-bit per channel under int4: 3 input channels, no block of 32)."""
    info = {"method": "linear_symmetric", "dtype": quant, "weight_threshold": WEIGHT_THRESHOLD}
    info.update({"granularity": "per_block", "block_size": BLOCK_SIZE, "conv": "int8 per_channel"}
                if quant == "int4" else {"granularity": "per_channel"})
    info["vision"] = (f"int4 per block of {BLOCK_SIZE} (patch convolution int8 per channel)" if quant == "int4"
                      else "int8 per channel")
    return info
