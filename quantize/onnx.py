"""ONNX quantization with onnxruntime's own tools, and the last steps every ONNX artifact shares.

int8: dynamic quantization (onnxruntime.quantization.quantize_dynamic): every MatMul with a constant weight gets
      int8 weights (per output channel) and uint8 activations quantized at run time (MatMulInteger); the token
      embedding table (Gather) is stored int8 too.
q4:   weight-only 4-bit (MatMulNBitsQuantizer): every MatMul with a constant weight becomes MatMulNBits (blocks of 32
      along the input dimension, symmetric, one fp32 scale per block). The token embedding table is stored 8-bit as
      in int8 (Gather + DequantizeLinear): onnxruntime's 4-bit GatherBlockQuantized has no WebAssembly kernel in
      onnxruntime-web, and a q4 export must run in a phone's browser. The vision encoder is int8 as in int8
      (part_method). MatMulNBits carries accuracy_level 4 (Q4_ACCURACY_LEVEL): where onnxruntime has the kernel
      (x86 AVX2/VNNI, ARM dot-product) each row of activations is quantized to int8 per block and the 4-bit
      weights meet it in integer dot products; elsewhere the attribute is a hint and the fp32 kernel runs.
      tests/test_onnx.py checks the graphs against their dequantized weights.
fp16: (export only) every float tensor inside the graphs in fp16, inputs/outputs kept fp32 as transformers.js feeds
      them; RMSNorm's mean-of-squares stays fp32 so large activations cannot overflow it.

Each part is read from an fp32 artifact and written as <part><suffix>.onnx + .onnx_data. Afterwards the graphs are
checked: no MatMul with a constant float weight may remain (or onnxruntime skipped it silently).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from pocketvlm.artifact import base_tools, copy_processor_files, inherited
from pocketvlm.errors import ArtifactError, PocketVLMError, one_line
from pocketvlm.formats.onnx import DATA_SUFFIX, PARTS, SUBFOLDER, part_file
from pocketvlm.manifest import atomic_output, write_manifest
Q4_BLOCK_SIZE = 32
# MatMulNBits' compute type. 0 (and 1-3 on CPUs: the same fp32 path) dequantizes the 4-bit weights and multiplies
# in fp32; 4 quantizes the activations to int8 and uses integer dot products, as onnxruntime-genai's int4 CPU models
# do. Measured at the SmolVLM2-500M shape (docs/BENCH.md "ONNX q4: MatMulNBits accuracy_level"): level 4 decodes
# ~1.3-3x faster on 2 busy cores (CPU time per request 7.3-7.6 s vs 8.4-9.0 s) with the same KL divergence to the
# reference (1.91e-2 mean at both levels, 500M shape; on the trained micro model see BENCH.md). A kernel without an
# int8 path (onnxruntime-web's WebAssembly) ignores the hint and computes in fp32, as level 0 would.
Q4_ACCURACY_LEVEL = 4
# fp16: ops kept in fp32 (with casts around them) on top of onnxruntime's default block list: RMSNorm's x**2 mean
# (and the rotary-angle nodes, rope_nodes)
FP16_KEEP_FP32 = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")


def log(progress: bool, message: str) -> None:
    if progress:
        print(f"pocketvlm: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ files

def save(model, dest: Path) -> None:
    """Write an onnx_ir model as DEST + DEST_data (weights), the layout transformers.js expects."""
    import onnx_ir as ir

    dest.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, dest, external_data=dest.name + DATA_SUFFIX)


def resave(src: Path, dest: Path) -> None:
    """Copy a model written by onnxruntime's tools (weights in <name>.data, or inline) into our layout."""
    import onnx_ir as ir

    save(ir.load(src), dest)


def load_proto(path: Path, root: Path, *, weights: bool = True):
    """The ModelProto of one part (with its weights), any failure to read it as one line."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # DecodeError on a corrupt graph, ValidationError/OSError on a weights file, ...
        raise ArtifactError(f"{root}: cannot read {path.relative_to(root)} ({e.__class__.__name__}: "
                            f"{one_line(e, 160)}); the artifact is corrupt or incomplete") from e


def check_part(path: Path, root: Path) -> None:
    """A part that parses and whose weights file holds every tensor it points into, or one line saying why not."""
    import onnx

    model = load_proto(path, root, weights=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data = path.parent / info.get("location", "")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not data.is_file():
            raise ArtifactError(f"{root}: {data.relative_to(root)} (the weights of {path.relative_to(root)}) is "
                                f"missing; re-export the artifact")
        if data.stat().st_size < end:
            raise ArtifactError(f"{root}: {data.relative_to(root)} is truncated ({data.stat().st_size} bytes, "
                                f"{tensor.name} ends at {end}); re-export the artifact")


def op_counts(path: Path) -> collections.Counter:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def float_weights(path: Path) -> dict[str, int]:
    """Nodes that read a float initializer as their weight: MatMul (input B) and Gather (the table). int8/q4 must
    leave none of the kinds they quantize."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = {i.name for i in model.graph.initializer if i.data_type in floats and len(i.dims) == 2}
    return {"MatMul": sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights),
            "Gather": sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights)}


# --------------------------------------------------------------------------------------------- converting

def convert_part(src: Path, dest: Path, part: str, quant: str, work: Path, root: Path) -> dict:
    """One part of an fp32 artifact (checked with check_part) -> DEST in QUANT (int8, q4 or fp16). Returns what the
    manifest records."""
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f"{part}.onnx"
    how = part_method(quant, part)
    try:
        with _quiet_logs():
            if how == "int8":
                _int8(src, tmp, part)
            elif how == "q4":
                _q4(src, tmp, part, root)
            else:
                _fp16(src, tmp, root)
    except MemoryError as e:
        raise PocketVLMError(f"out of memory converting the {part} graph to {how}; close other programs or "
                             f"convert on a machine with more memory") from e
    except Exception as e:
        if not _raised_by_tools(e):
            raise  # our own bug: keep the traceback
        # not the folder: during an export it is a scratch folder the user never sees
        raise ArtifactError(f"cannot convert the {part} graph to {how}: onnxruntime's tools refused it "
                            f"({e.__class__.__name__}: {one_line(e, 200)})") from e
    gc.collect()  # onnxruntime's quantizers leave reference cycles holding the weights (1.6 GB at 500M for q4)
    resave(tmp, dest)
    shutil.rmtree(work, ignore_errors=True)
    gc.collect()
    return _verify_part(src, dest, part, how)


def _raised_by_tools(error: BaseException) -> bool:
    """Whether ERROR came out of onnx's or onnxruntime's own code (a graph their checks refuse: shape inference,
    the checker, a quantizer's assumptions), judged by the innermost Python frame it passed through."""
    tb, module = error.__traceback__, ""
    while tb is not None:
        module, tb = tb.tb_frame.f_globals.get("__name__", ""), tb.tb_next
    return module.split(".")[0] in ("onnx", "onnxruntime", "onnx_ir")


def part_method(quant: str, part: str) -> str:
    """How one part of a QUANT artifact is converted. q4 is 4-bit where decoding spends its time, the text
    decoder; its embedding table is 8-bit (see the module docstring) and so is its vision encoder: MatMulNBits
    dequantized to fp32 on the CPU at accuracy_level 0, so a 4-bit vision encoder ran at fp32 speed (1.57 s per
    512-px tile at the 500M shape against int8's 0.78 s), and the vision encoder is most of the time to first
    token; int8 is also what onnxruntime-web runs everywhere (MatMulInteger)."""
    if quant not in ("int8", "q4", "fp16"):
        raise PocketVLMError(f"unknown ONNX quant {quant!r}")
    if quant == "q4" and part in ("embed_tokens", "vision_encoder"):
        return "int8"
    return quant


@contextlib.contextmanager
def _quiet_logs():
    """onnxruntime's tools log every node they touch (INFO) and advice (WARNING); their chatter is not ours."""
    names = [""] + [n for n in logging.root.manager.loggerDict if n.startswith("onnxruntime")]
    names += ["onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _int8(src: Path, tmp: Path, part: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gather"] if part == "embed_tokens" else ["MatMul"]
    with _one_copy_of_the_weights(src):
        quantize_dynamic(src, tmp, op_types_to_quantize=ops, per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})


def _has_gemm(src: Path) -> bool:
    """Whether the graph at SRC (or any subgraph of it) has a Gemm node; reads the graph, not its weights."""
    import onnx

    def walk(graph):
        for node in graph.node:
            if node.op_type == "Gemm":
                return True
            for attr in node.attribute:
                subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                if any(walk(g) for g in subgraphs):
                    return True
        return False

    return walk(onnx.load(str(src), load_external_data=False).graph)


@contextlib.contextmanager
def _one_copy_of_the_weights(src: Path):
    """quantize_dynamic loads the graph with its weights and shape inference (one copy), then ONNXQuantizer's
    constructor re-runs shape inference by deep-copying the whole model, saving the copy and loading it again, in
    case it turned Gemm nodes into MatMul: three copies of the weights at once (the int8 decoder of the 500M shape
    peaked at 4.5 GB for 1.45 GB of fp32 weights, 7.4 GB for the whole export). Our graphs have no Gemm (the
    exporter writes Linear as MatMul), so nothing changes there and the value types inferred on load still hold:
    for a source graph without Gemm (checked before quantizing: by the time the hook runs, any Gemm is already a
    MatMul) the reload is skipped; a graph with Gemm keeps onnxruntime's own step. onnxruntime is pinned
    (.ci/constraints.txt); without the hook point this does nothing and the quantization only uses more memory."""
    from onnxruntime.quantization import onnx_quantizer

    original = getattr(onnx_quantizer, "save_and_reload_model_with_shape_infer", None)
    if original is None or _has_gemm(src):
        yield
        return
    onnx_quantizer.save_and_reload_model_with_shape_infer = lambda model: model
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def _q4(src: Path, tmp: Path, part: str, root: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ops = ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(block_size=Q4_BLOCK_SIZE, is_symmetric=True,
                                          accuracy_level=Q4_ACCURACY_LEVEL, op_types_to_quantize=ops)
    quantizer = MatMulNBitsQuantizer(load_proto(src, root), bits=4, block_size=Q4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=Q4_ACCURACY_LEVEL, op_types_to_quantize=ops, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=True)


def rope_nodes(graph) -> list[str]:
    """The nodes that turn position_ids into rotary cos/sin (everything on a path from that input to a Cos or Sin).
    Kept in fp32: the angle is position x inv_freq, and at position 169 fp16's step is 0.125, so cos/sin came out
    ~0.03 off and the rotated q/k 20x noisier than the rest of the graph (23 ulps of the top logit on the trained
    micro model, against 4.5 for MLX fp16; docs/BENCH.md "Fidelity gates")."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for x in n.input:
            consumers[x].append(n)
    after, todo = set(), ["position_ids"]
    while todo:
        for n in consumers.get(todo.pop(), []):
            if n.name not in after:
                after.add(n.name)
                todo.extend(n.output)
    ends = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    before, todo = {n.name for n in ends}, [x for n in ends for x in n.input]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.name not in before:
            before.add(n.name)
            todo.extend(n.input)
    return [n.name for n in graph.node if n.name in after and n.name in before]


def cast_round_trips(graph) -> dict[str, str]:
    """Cast(fp32, Cast(fp16, x)) with x already fp32, as {the outer Cast's output: x}. onnxruntime's float16
    converter puts such a pair between any two adjacent nodes it keeps in fp32, so a kept chain (rotary angles;
    RMSNorm's x**2 -> mean) is still rounded to fp16 at every link."""
    from onnx import TensorProto

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    trips = {}
    for n in graph.node:
        if cast_to(n) != TensorProto.FLOAT or n.output[0] in outputs:
            continue
        half = producer.get(n.input[0])
        if half is not None and cast_to(half) == TensorProto.FLOAT16 and types.get(half.input[0]) == TensorProto.FLOAT:
            trips[n.output[0]] = half.input[0]
    return trips


def drop_cast_round_trips(graph) -> int:
    """Read x where a cast_round_trips pair rounded it, and remove the casts nothing reads any more. Returns how
    many pairs were bypassed."""
    rewire = cast_round_trips(graph)
    for n in graph.node:
        n.input[:] = [rewire.get(x, x) for x in n.input]
    outputs = {o.name for o in graph.output}
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return len(rewire)
        for n in dead:
            graph.node.remove(n)


def _fp16(src: Path, tmp: Path, root: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    fp32 = load_proto(src, root)
    # the exporter writes every value's type, so shape inference (which cannot serialise > 2 GB) is not needed
    model = convert_float_to_float16(fp32, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32),
                                     node_block_list=rope_nodes(fp32.graph))
    drop_cast_round_trips(model.graph)
    onnx.save(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")


def _verify_part(src: Path, dest: Path, part: str, how: str) -> dict:
    """After conversion: every weight matmul (and the embedding table) is quantized as part_method says; counts
    for the manifest."""
    before, after = float_weights(src), float_weights(dest)
    ops = op_counts(dest)
    info = {"weight_matmuls": before["MatMul"], "method": how}
    if how == "fp16":
        return info
    quant = how
    info["quantized_matmuls"] = ops["MatMulInteger" if quant == "int8" else "MatMulNBits"]
    if after["MatMul"] or info["quantized_matmuls"] != before["MatMul"]:
        raise ArtifactError(f"{dest.name}: onnxruntime quantized {info['quantized_matmuls']} of {before['MatMul']} "
                            f"weight matmuls ({after['MatMul']} left in float); refusing a partly quantized artifact")
    if part == "embed_tokens":
        if after["Gather"] or not before["Gather"]:
            raise ArtifactError(f"{dest.name}: the token embedding table was not quantized")
        info["quantized_embedding"] = True
    return info


# ------------------------------------------------------------------------------------- artifact-level steps

def convert_artifact(src_root: Path, dest_root: Path, quant: str, *, progress: bool) -> dict:
    """Every part of the fp32 artifact at SRC_ROOT -> DEST_ROOT in QUANT. Returns per-part info."""
    for part in PARTS:  # every part readable before any work starts
        src = src_root / part_file("fp32", part)
        if not src.is_file():
            raise ArtifactError(f"{src_root}: {part_file('fp32', part)} (the {part} graph) is missing; "
                                f"re-export the artifact")
        check_part(src, src_root)
    info = {}
    for part in PARTS:
        src = src_root / part_file("fp32", part)
        start = time.perf_counter()
        log(progress, f"{quant}: {part} ...")
        info[part] = convert_part(src, dest_root / part_file(quant, part), part, quant,
                                  dest_root / f".work-{part}", src_root)
        log(progress, f"{quant}: {part} done in {time.perf_counter() - start:.1f}s")
    return info


# what the vision encoder's weights are, per the method its part was converted with (part_method)
VISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8 per channel (dynamic uint8 activations)"}


def method(quant: str) -> dict:
    if quant == "int8":
        return {"tool": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 per output channel",
                "activations": "uint8, dynamic", "ops": ["MatMul", "Gather (embed_tokens)"],
                "vision": VISION["int8"]}
    if quant == "q4":
        return {"tool": "onnxruntime.quantization.MatMulNBitsQuantizer", "op": "MatMulNBits",
                "bits": 4, "block_size": Q4_BLOCK_SIZE, "symmetric": True, "accuracy_level": Q4_ACCURACY_LEVEL,
                "embedding": "uint8 per tensor (Gather + DequantizeLinear, quantize_dynamic)",
                "vision": VISION["int8"]}
    if quant == "fp16":
        return {"tool": "onnxruntime.transformers.float16", "io": "float32",
                "kept_fp32": [*FP16_KEEP_FP32, "rotary angles (position_ids -> cos/sin)"],
                "vision": VISION["fp16"]}
    return {"vision": VISION["fp32"]}


def finish(folder: Path, quant: str, *, source: dict, tools: dict, parts: dict | None = None, **extra) -> None:
    """Shared last steps of export and quantize: transformers.js hints, the chat template, the manifest."""
    folder = Path(folder)
    for part in PARTS:
        if not (folder / part_file(quant, part)).is_file():
            raise ArtifactError(f"bug: {part_file(quant, part)} was not written")
    _transformers_js_config(folder, quant)
    _embed_chat_template(folder)
    write_manifest(folder, format="onnx", quant=quant, source=source, tools=tools,
                   onnx={"files": {part: part_file(quant, part) for part in PARTS},
                         "external_data": DATA_SUFFIX, "quantization": {**method(quant), "parts": parts or {}}},
                   **extra)


def _transformers_js_config(folder: Path, quant: str) -> None:
    """config.json["transformers.js_config"]: which dtype's files to load, and that their weights are external."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    external = {}
    for part in PARTS:
        name = Path(part_file(quant, part)).name
        if (folder / SUBFOLDER / (name + DATA_SUFFIX)).is_file():
            external[name] = 1
    config["transformers.js_config"] = {"dtype": quant, "use_external_data_format": external}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _embed_chat_template(folder: Path) -> None:
    """transformers.js reads the chat template from tokenizer_config.json only; copy chat_template.jinja there."""
    template, tok_path = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if not template.is_file() or not tok_path.is_file():
        return
    tok = json.loads(tok_path.read_text())
    if "chat_template" not in tok:
        tok["chat_template"] = template.read_text()
        tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")


def tools() -> dict:
    import onnx
    import onnxruntime

    return {**base_tools(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def quantize(artifact: Path, manifest: dict, out: Path, quant: str, *, force: bool, progress: bool) -> Path:
    """int8/q4 from an fp32 ONNX artifact, parts quantized one by one with onnxruntime's tools."""
    artifact = Path(artifact)
    with atomic_output(out, force=force) as scratch:
        copy_processor_files(artifact, scratch)
        parts = convert_artifact(artifact, scratch, quant, progress=progress)
        finish(scratch, quant, source=manifest["source"], tools=tools(), parts=parts,
               derived_from={"path": str(artifact), "quant": manifest["quant"]}, **inherited(manifest))
    return out
