"""Peak memory of exporting and of running, measured from outside the process (a benchmark, not a test).

    python -m pocketvlm.bench_device.memory export MODEL --out DIR [--only onnx:int8,gguf:q4_k_m ...] [--json F]
    python -m pocketvlm.bench_device.memory run ARTIFACT... --image IMG [--image-size 512 --image-size 0]
                                                          [--vision-batch 1 --vision-batch 4 ...] [--json F]

`export` runs `pocketvlm export MODEL --to F --quant Q` once per format/quant in a subprocess and samples the
resident memory of its whole process tree (the GGUF converter runs in a child of its own) every 50 ms from /proc:
the peak of the tree's summed RSS, the peak within each phase (a phase is the exporter's last progress line, so the
table says where the peak is), wall time, and the peak as a multiple of the model's fp32 weights (the target is
<= 2.5x). `run` opens each artifact in a fresh process, asks one question about IMG at each image budget
(`--image-size 512` is one tile at the 500M shape; 0 means the artifact's own budget, 13 tiles for
samples/images/red_circle.png there) and reports that process's VmHWM against the run-time targets (one tile:
<= 1.5x the artifact's size + 200 MB; many tiles: <= 2x + 200 MB), with the encode time, TTFT and decode speed.
`--vision-batch N` sets the backend's tiles-per-encoder-call before the run (how the batch sizes were chosen).

Linux only (/proc). Every row records the load average before and after it: on a shared machine the times are
noisy, the memory figures much less so. docs/BENCH.md keeps the figures and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

EXPORTS = ("gguf:f16", "gguf:q8_0", "gguf:q4_k_m", "onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:q4",
           "mlx:fp16", "mlx:8bit", "mlx:4bit", "coreml:fp16", "coreml:int8", "coreml:int4")
EXPORT_TARGET = 2.5            # peak RSS / fp32 weight bytes
SAMPLE_S = 0.05
MB = 1e6


# ------------------------------------------------------------------------------------------- sampling

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, now."""
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        total += _rss(p)
        todo += kids.get(p, [])
    return total


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def measure(cmd: list[str], env: dict | None = None, on_line=None) -> dict:
    """Run cmd, sampling its process tree's RSS; its stderr lines name the phases (and go to on_line as they come,
    so a long export shows it is alive)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[tuple[float, str]] = [(0.0, "start")]
    out: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            if line.strip():
                lines.append((time.perf_counter() - start, line.strip()))
                if on_line:
                    on_line(line.strip())

    def read_stdout():
        out.append(proc.stdout.read())

    threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - start, tree_rss(proc.pid)))
        time.sleep(SAMPLE_S)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    phases = []
    for i, (t0, name) in enumerate(lines):
        t1 = lines[i + 1][0] if i + 1 < len(lines) else wall
        peak = max((rss for t, rss in samples if t0 <= t < t1), default=0)
        phases.append({"phase": name[:90], "start_s": round(t0, 1), "peak_rss": peak})
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss": max((r for _, r in samples), default=0),
            "phases": phases, "stderr": "\n".join(name for _, name in lines[1:]), "stdout": "".join(out)}


# --------------------------------------------------------------------------------------------- export

def fp32_weight_bytes(model: Path) -> int:
    """4 bytes per parameter of the checkpoint, read from the safetensors headers (no weights loaded)."""
    total = 0
    for f in sorted(Path(model).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += 4 * count
    return total


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cmd_export(args) -> int:
    model, root = Path(args.model), Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    weights = fp32_weight_bytes(model)
    rows = []
    for spec in args.only or EXPORTS:
        fmt, quant = spec.split(":")
        out = root / f"{fmt}-{quant}"
        before = load()
        result = measure([sys.executable, "-m", "pocketvlm", "export", str(model), "--to", fmt, "--quant", quant,
                          "--out", str(out), "--force", *args.extra])
        row = {"format": fmt, "quant": quant, "rc": result["rc"], "wall_s": result["wall_s"],
               "peak_rss": result["peak_rss"], "x_fp32": round(result["peak_rss"] / weights, 2),
               "size": size_on_disk(out) if out.is_dir() else None, "load_before": before, "load_after": load(),
               "peak_phase": max(result["phases"], key=lambda p: p["peak_rss"])["phase"],
               "phases": result["phases"]}
        if result["rc"] != 0:
            row["error"] = result["stderr"].splitlines()[-1:] or ["?"]
        rows.append(row)
        print(f"{fmt} {quant}: peak {row['peak_rss'] / MB:.0f} MB ({row['x_fp32']}x fp32 weights) in "
              f"{row['wall_s']}s, load {before} -> {row['load_after']}; peak during: {row['peak_phase']}",
              file=sys.stderr, flush=True)
        for phase in result["phases"]:
            print(f"    {phase['start_s']:>7.1f}s {phase['peak_rss'] / MB:>6.0f} MB  {phase['phase']}", file=sys.stderr,
                  flush=True)
        if not args.keep and out.is_dir():
            subprocess.run(["rm", "-rf", str(out)], check=False)
    report = {"model": str(model), "fp32_weight_bytes": weights, "target_x_fp32": EXPORT_TARGET, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(export_table(report))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def export_table(report: dict) -> str:
    w = report["fp32_weight_bytes"]
    lines = [f"fp32 weights {w / MB:.0f} MB; target peak <= {EXPORT_TARGET}x = {EXPORT_TARGET * w / MB:.0f} MB", "",
             "| export | peak RSS | × fp32 weights | where the peak is | time s | size | load (before → after) |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        status = "" if r["rc"] == 0 else " (failed)"
        lines.append(f"| {r['format']} {r['quant']}{status} | {r['peak_rss'] / MB:.0f} MB | {r['x_fp32']:.2f} | "
                     f"{r['peak_phase']} | {r['wall_s']:.0f} | "
                     f"{(r['size'] or 0) / MB:.0f} MB | {r['load_before']} → {r['load_after']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run

def run_one(spec: dict) -> dict:
    """Inside the measured process: open, (set the vision batch), one request, VmHWM."""
    from pocketvlm.media import open_image
    from pocketvlm.prompt import Request
    from pocketvlm.runtime import open_backend

    backend = open_backend(spec["artifact"], threads=spec.get("threads"), torch_free=spec["torch_free"],
                           image_size=spec.get("image_size") or None)
    if spec.get("vision_batch"):
        backend.vision_batch = spec["vision_batch"]
    after_load = _hwm()
    request = Request(spec["question"], images=[open_image(spec["image"])])
    cpu = time.process_time()
    result = backend.run(request, spec["max_tokens"], ignore_eos=True)
    cpu = time.process_time() - cpu  # CPU seconds of the request: less sensitive than wall time to a busy machine
    t = result.timings
    return {"backend": backend.name, "quant": backend.quant, "tiles": result.image_tiles,
            "vision_batch": getattr(backend, "vision_batch", None), "encode_s": t.encode_s, "ttft_s": t.ttft_s,
            "decode_tok_s": t.decode_tok_s, "cpu_s": round(cpu, 2), "rss_after_load": after_load,
            "peak_rss": _hwm()}


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cmd_run(args) -> int:
    rows = []
    for artifact in args.artifacts:
        manifest = json.loads((Path(artifact) / "pocketvlm.json").read_text())
        size = size_on_disk(Path(artifact))
        for image_size in args.image_size or [0]:
            for batch in args.vision_batch or [0]:
                spec = {"artifact": artifact, "image": args.image, "question": args.question,
                        "max_tokens": args.max_tokens, "threads": args.threads, "image_size": image_size,
                        "vision_batch": batch, "torch_free": manifest.get("format") != "hf"}
                before = load()
                proc = subprocess.run([sys.executable, "-m", "pocketvlm.bench_device.memory", "run-one",
                                       json.dumps(spec)], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{artifact}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "artifact": artifact, "size": size,
                       "load_before": before, "load_after": load()}
                factor = 1.5 if row["tiles"] <= 1 else 2.0
                row["target"] = int(factor * size + 200 * MB)
                rows.append(row)
                print(f"{artifact} {row['tiles']} tiles batch {row['vision_batch']}: peak {row['peak_rss'] / MB:.0f} "
                      f"MB (target {row['target'] / MB:.0f}), encode {row['encode_s']:.2f}s, TTFT "
                      f"{row['ttft_s']:.2f}s, load {before}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(run_table(rows))
    return 0


def run_table(rows: list[dict]) -> str:
    lines = ["| artifact | size | tiles | vision batch | peak RSS | target | encode s | TTFT s | decode tok/s | "
             "CPU s | load (before → after) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["peak_rss"] <= r["target"] else " ✗"
        lines.append(f"| {r['backend']} {r['quant']} | {r['size'] / MB:.0f} MB | {r['tiles']} | "
                     f"{r['vision_batch'] or '-'} | {r['peak_rss'] / MB:.0f} MB{ok} | {r['target'] / MB:.0f} MB | "
                     f"{r['encode_s'] or 0:.2f} | {r['ttft_s']:.2f} | {r['decode_tok_s'] or 0:.1f} | "
                     f"{r.get('cpu_s', 0):.1f} | {r['load_before']} → {r['load_after']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-one"]:
        print(json.dumps(run_one(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m pocketvlm.bench_device.memory", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="peak RSS and time of each export")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="folder for the exports (each removed after it is measured)")
    p.add_argument("--only", type=lambda s: s.split(","), help="format:quant list (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the exports")
    p.add_argument("--json")
    p.add_argument("extra", nargs="*", help="after --: more export flags")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("run", help="peak RSS of one request per artifact and image budget")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="Describe this image.")
    p.add_argument("--image-size", type=int, action="append", help="image budget in px; 0: the artifact's own")
    p.add_argument("--vision-batch", type=int, action="append", help="tiles per vision-encoder call")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
