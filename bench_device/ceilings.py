"""What this machine lets the engines reach, beside issue 17's targets: the ceilings no wrapper can pass (a benchmark,
not a test).

    python -m pocketvlm.bench_device.ceilings [--preset 500m] [--threads 2] [--runs 10] [--work DIR] [--json FILE]

Two figures, each measured from the preset's real shapes (random weights: the time does not depend on their values):
- **vision**: the vision encoder's arithmetic per tile (its matmuls, attention included, the patch embedding and
  the connector) against the best f32 GEMM rate of these cores (torch's and numpy's BLAS, the encoder's own MLP
  shape). An engine that multiplies in f32 cannot encode a tile much faster than the ratio, whatever its weights
  are stored as; going well below it takes integer or bf16 kernels.
- **decode**: a graph holding only the text model's weight matmuls at one token (every layer's q/k/v/o and MLP, and
  the lm head; no attention, norms, rotary or KV cache), quantized with the ONNX export's own settings
  (quantize/onnx.py: int8 = quantize_dynamic, q4 = MatMulNBits), run in onnxruntime. Its weight bytes over its step
  time is the fastest onnxruntime reads weights on these cores; as a share of the memory bandwidth (measured
  beside each run of steps) it is the highest "of roofline" an ONNX decode can show here, before the rest of the
  graph costs anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pocketvlm.errors import EXIT_USER_ERROR, PocketVLMError, one_line

from .image_budget import ROOFLINE_MIN, WIDTH


def decode_quants() -> list[str]:
    """The ONNX export's 8-bit and 4-bit quants, the ones issue 17's roofline targets are for."""
    from pocketvlm import formats

    return [q for q in formats.EXPORT_FORMATS["onnx"].export_quants if q in WIDTH]


def vocab_size(p: dict) -> int:
    """The lm head's rows: the published layout's vocabulary, else the compact tokenizer's padded BPE size (the
    tokenizer itself is trained when a model is made; within a multiple of 64 is enough for a ceiling)."""
    from pocketvlm.presets import tokenizer_layout

    layout = tokenizer_layout(p["tokenizer"])
    if "vocab_size" in layout:
        return int(layout["vocab_size"])
    pad = int(layout.get("pad_to_multiple", 64))
    return math.ceil(int(layout["bpe_vocab"]) / pad) * pad


def gemm_shape(p: dict) -> tuple[int, int, int]:
    """The vision encoder's MLP up-projection: [patches, hidden] x [hidden, inner]."""
    v = p["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2, v["hidden_size"], v["intermediate_size"]


def vision_flops_per_tile(p: dict) -> float:
    """Multiply-adds x 2 of one tile through the vision encoder and the connector."""
    v, hidden_text = p["vision"], p["text"]["hidden_size"]
    patches, h, inner = gemm_shape(p)
    layers = v["num_hidden_layers"]
    linear = patches * layers * (4 * h * h + 2 * h * inner)
    attention = layers * 2 * patches * patches * h  # scores and their weighted sum
    patch_embed = patches * 3 * v["patch_size"] ** 2 * h
    connector = patches * h * hidden_text  # pixel shuffle keeps the elements, the projection maps them
    return 2.0 * (linear + attention + patch_embed + connector)


def best_gemm_seconds(multiply, runs: int) -> float:
    for _ in range(3):
        multiply()
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        multiply()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_gemm_seconds(m: int, k: int, n: int, runs: int) -> float:
    import numpy as np

    a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
    return best_gemm_seconds(lambda: a @ b, runs)


def f32_gemm_flops(p: dict, threads: int, runs: int) -> dict[str, float]:
    """The best f32 GEMM rate of torch's and numpy's BLAS on the encoder's MLP shape, each on THREADS threads (two
    libraries: on the 2-core EPYC they differed by a quarter, so one alone would understate what the cores do).
    numpy's OpenBLAS takes its thread count when it loads, so it runs in a child process."""
    import torch

    m, k, n = gemm_shape(p)
    flops = 2.0 * m * k * n
    torch.set_num_threads(threads)
    a, b = torch.ones(m, k), torch.ones(k, n)
    rates = {"torch": flops / best_gemm_seconds(lambda: a @ b, runs)}
    code = (f"from pocketvlm.bench_device.ceilings import numpy_gemm_seconds; "
            f"print(numpy_gemm_seconds({m}, {k}, {n}, {runs}))")
    env = {**os.environ, **{v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 0:
        rates["numpy"] = flops / float(proc.stdout.strip().splitlines()[-1])
    return rates


def weight_matmul_graph(p: dict, path: Path) -> None:
    """The text model's weight matmuls at one token as an fp32 ONNX graph (weights in PATH.onnx_data): per layer
    q, k, v (from x), o (from q), gate and up (from x), down (from gate x up), x' = o + down; then the lm head."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = p["text"]
    d, inner, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = t["num_key_value_heads"] * (d // t["num_attention_heads"])
    rng = np.random.default_rng(0)
    nodes, weights, side_outputs = [], [], []

    def weight(name: str, rows: int, cols: int) -> str:
        weights.append(numpy_helper.from_array(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, name))
        return name

    x = "x"
    for i in range(layers):
        name = lambda s: f"layers.{i}.{s}"  # noqa: E731
        for s, cols in (("q", d), ("k", kv), ("v", kv), ("gate", inner), ("up", inner)):
            nodes.append(helper.make_node("MatMul", [x, weight(name(s + ".weight"), d, cols)], [name(s)]))
        nodes.append(helper.make_node("MatMul", [name("q"), weight(name("o.weight"), d, d)], [name("o")]))
        nodes.append(helper.make_node("Mul", [name("gate"), name("up")], [name("act")]))
        nodes.append(helper.make_node("MatMul", [name("act"), weight(name("down.weight"), inner, d)], [name("down")]))
        nodes.append(helper.make_node("Add", [name("o"), name("down")], [name("x")]))
        side_outputs += [name("k"), name("v")]  # outputs, so nothing is pruned
        x = name("x")
    nodes.append(helper.make_node("MatMul", [x, weight("lm_head.weight", d, vocab_size(p))], ["logits"]))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ["logits", *side_outputs]]
    graph = helper.make_graph(nodes, "weight_matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")


def decode_ceiling(src: Path, quant: str, threads: int, runs: int, work: Path) -> dict:
    """Quantize the weight-matmul graph SRC as the ONNX export does and time one token through it. Each run measures
    the memory bandwidth right before its steps, and the share of roofline is the median of the runs' own ratios:
    on a shared VM both swing by a third from one minute to the next (int8 here read 67-98% of a bandwidth measured
    apart from the steps)."""
    import numpy as np
    import onnxruntime as ort

    from pocketvlm.quantize import onnx as qonnx

    from .device import memory_bandwidth_gbs

    dest = work / f"{quant}.onnx"
    qonnx.convert_part(src, dest, "decoder_model_merged", quant, work / f"{quant}-scratch", src.parent)
    size = sum(f.stat().st_size for f in work.glob(f"{quant}.onnx*"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(str(dest), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, session.get_inputs()[0].shape[1]), dtype=np.float32)}
    for _ in range(5):
        session.run(None, feed)
    steps, bandwidths = [], []
    for _ in range(runs):
        bandwidths.append(memory_bandwidth_gbs(repeats=2))
        start = time.perf_counter()
        for _ in range(10):
            session.run(None, feed)
        steps.append((time.perf_counter() - start) / 10)
    step = statistics.median(steps)
    return {"quant": quant, "bytes": size, "step_s": step, "min_step_s": min(steps), "read_gbs": size / step / 1e9,
            "bandwidth_gbs": statistics.median(bandwidths),
            "of_roofline": statistics.median(size / s / 1e9 / bw for s, bw in zip(steps, bandwidths))}


def ceilings(preset_name: str, threads: int, runs: int, work: Path | None = None) -> dict:
    from pocketvlm.presets import preset

    from .device import describe_device

    p = preset(preset_name)
    device = describe_device()
    flops, rates = vision_flops_per_tile(p), f32_gemm_flops(p, threads, runs)
    gemm = max(rates.values())
    vision = {"gflop_per_tile": flops / 1e9, "f32_gemm_gflops": gemm / 1e9, "f32_s_per_tile": flops / gemm,
              "f32_gemm_gflops_by_library": {lib: rate / 1e9 for lib, rate in rates.items()}}
    with tempfile.TemporaryDirectory(prefix="pocketvlm-ceilings-", dir=work) as tmp:
        src = Path(tmp) / "weight_matmuls.onnx"
        weight_matmul_graph(p, src)
        decode = [decode_ceiling(src, q, threads, runs, Path(tmp)) for q in decode_quants()]
    for row in decode:
        row["target"] = ROOFLINE_MIN[WIDTH[row["quant"]]]
    return {"preset": preset_name, "threads": threads, "runs": runs, "device": device, "vision": vision,
            "decode": decode}


def table(result: dict) -> str:
    v = result["vision"]
    lines = [f"Preset {result['preset']}, {result['threads']} threads, {result['device']['cpu']}, "
             f"{result['device']['memory_bandwidth_gbs']:.1f} GB/s measured memory bandwidth.", "",
             "| vision encoder, one tile | GFLOP | f32 GEMM GFLOP/s | s/tile at that rate |", "|---|---|---|---|",
             f"| {result['preset']} | {v['gflop_per_tile']:.3g} | {v['f32_gemm_gflops']:.0f} | "
             f"{v['f32_s_per_tile']:.3g} |", "",
             "| decode, weight matmuls only (onnxruntime) | weight bytes | step ms (min) | read GB/s | bandwidth "
             "GB/s, beside | of roofline | target |", "|---|---|---|---|---|---|---|"]
    for row in result["decode"]:
        lines.append(f"| {row['quant']} | {row['bytes'] / 1e6:.0f} MB | {row['step_s'] * 1e3:.2f} "
                     f"({row['min_step_s'] * 1e3:.2f}) | {row['read_gbs']:.1f} | {row['bandwidth_gbs']:.1f} | "
                     f"{row['of_roofline']:.0%} | "
                     f"{row['target']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pocketvlm.presets import preset_names

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="500m", help=f"model shape: {', '.join(preset_names())} (default: 500m)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (default: every core)")
    p.add_argument("--runs", type=int, default=10, help="timed repeats per figure (default: 10)")
    p.add_argument("--work", type=Path, default=None,
                   help="where the temporary graphs go (default: the system's temp dir; ~1.5 GB at 500m)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        if args.threads < 1 or args.runs < 1:
            raise PocketVLMError("--threads and --runs must be at least 1")
        for flag, folder in (("--work", args.work), ("--json", args.json and args.json.parent)):
            if folder is not None and not folder.is_dir():
                raise PocketVLMError(f"{flag} {folder}: not a folder")
        try:
            result = ceilings(args.preset, args.threads, args.runs, args.work)
        except (OSError, MemoryError) as e:  # the graphs are ~1.5 GB at 500m: a full disk or a small machine
            where = args.work or tempfile.gettempdir()
            raise PocketVLMError(f"could not build or run the weight-matmul graphs in {where} "
                                 f"({one_line(e, 200)}); free space or memory, or pass --work") from e
    except PocketVLMError as e:
        print(f"pocketvlm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(table(result), end="")
    if args.json is not None:  # written whole or not at all
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
