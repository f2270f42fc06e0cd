"""Reproduce docs/BENCH.md's image-budget table (issue 17) with one command: build a random-weight model at a real
SmolVLM2 shape, export the 8-bit and 4-bit variants (each export's peak memory measured from outside), bench them
beside the fp32 reference at each image budget, and judge the targets from that one run.

    python -m pocketvlm.bench_device.image_budget WORK [--preset 500m] [--variants gguf:q8_0,onnx:int8,...]
        [--image-sizes 512,1024,2048] [--runs 3] [--warmup 1] [--max-tokens 32] [--threads 2] [--doc docs/BENCH.md]

WORK/<preset>/ keeps the model, the exports, bench's results.json / report.md / plots (bench/) and table.md;
`--reuse` benches the model and exports already there instead of rebuilding them (their export memory is then not
measured).
With `--doc FILE`, the part of FILE between the lines `<!-- image_budget:begin -->` and `<!-- image_budget:end -->`
is replaced by the new tables and the budget plot is copied beside it (img/image_budget-<preset>.png); nothing else
in FILE changes, and FILE is checked before the hour of work starts.

Weights are random (speed and memory do not depend on their values) and every run generates a fixed number of tokens
(end of sequence ignored). The targets are benchmark figures, never test assertions; wall times on a shared machine
are noisy, so the table records the load average before and after the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from pocketvlm.errors import EXIT_USER_ERROR, PocketVLMError

from . import memory

BEGIN, END = "<!-- image_budget:begin -->", "<!-- image_budget:end -->"
DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "samples" / "images" / "red_circle.png"
MB = 1e6

# weight width of each quantized variant, for the targets that differ by it
WIDTH = {"q8_0": 8, "int8": 8, "8bit": 8, "q4_k_m": 4, "q4": 4, "4bit": 4, "int4": 4}

# issue 17's targets (2 cores, 500M shape): the one place they are written down
ONE_TILE_TTFT_S = 1.0              # every 8-bit and 4-bit variant, one tile
BEST_ONE_TILE_TTFT_S = 0.7         # the best of them
ROOFLINE_MIN = {8: 0.8, 4: 0.6}    # decode tok/s as a share of memory bandwidth / bytes read per token
RSS_ONE_TILE = (1.5, 200 * MB)     # peak RSS <= factor x artifact size + bytes
RSS_MANY_TILES = (2.0, 200 * MB)
DEFAULT_TTFT_VS_REFERENCE = 0.4    # the best variant's TTFT at the model's own budget / the reference's, same run


def default_variants() -> list[str]:
    """Every 8-bit and 4-bit export whose backend predicts on this machine. MLX is left out on Linux: mlx-cpu's
    reference BLAS runs this shape ~100x slower than the other backends (954 s to first token at 13 tiles,
    docs/BENCH.md), which says nothing about Apple Silicon; name it in --variants to run it anyway."""
    from pocketvlm import formats

    return [f"{fmt.name}:{quant}" for fmt in formats.EXPORT_FORMATS.values()
            if fmt.runs_here() and not (fmt.name == "mlx" and platform.system() != "Darwin")
            for quant in fmt.export_quants if quant in WIDTH]


def parse_variants(text: str) -> list[tuple[str, str]]:
    """'gguf:q8_0,onnx:int8' -> [(format, quant)], each an export this machine can also run."""
    from pocketvlm import formats

    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fmt, sep, quant = item.partition(":")
        if not sep or not quant:
            raise PocketVLMError(f"--variants {item!r}: give FORMAT:QUANT, e.g. gguf:q4_k_m")
        descriptor = formats.get(fmt, exportable=True)
        quant = descriptor.check_quant(quant)
        if not descriptor.runs_here():
            raise PocketVLMError(f"--variants {item}: {fmt} artifacts do not run on {platform.system()} "
                                 f"(runs on {', '.join(descriptor.runs_on or ())})")
        if (fmt, quant) in out:
            raise PocketVLMError(f"--variants {item}: named twice")
        out.append((fmt, quant))
    if not out:
        raise PocketVLMError("--variants: give at least one FORMAT:QUANT")
    return out


def replace_section(text: str, body: str, where: str) -> str:
    """TEXT with the lines between BEGIN and END replaced by BODY; the markers must each appear once, in order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise PocketVLMError(f"{where}: needs one line {BEGIN} and, after it, one line {END} around the part to "
                             f"replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body.rstrip()}\n{END}{tail}"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_sizes(config) -> list[int]:
    """One tile, two tiles a side (when under the default), and the model's own budget (a ProcessorConfig's)."""
    return sorted({config.max_image_size, *(s for s in (2 * config.max_image_size,) if s < config.longest_edge),
                   config.longest_edge})


# ------------------------------------------------------------------------------------------------ the run

def build(work: Path, preset: str, variants: list[tuple[str, str]], *, reuse: bool, progress: bool):
    """The model and its exports in WORK; returns (model folder, [(variant, artifact)], export rows)."""
    from pocketvlm.make_model import make_model

    model = work / "model"
    if not (reuse and (model / "pocketvlm.json").is_file()):
        say(progress, f"making a random-weight model at the {preset} shape in {model}")
        make_model(model, preset, seed=0, force=True, progress=progress)
    weights = memory.fp32_weight_bytes(model)
    artifacts, rows = [], []
    for fmt, quant in variants:
        out = work / f"{fmt}-{quant}"
        artifacts.append(((fmt, quant), out))
        if reuse and (out / "pocketvlm.json").is_file():
            say(progress, f"{fmt} {quant}: reusing {out} (export memory not measured)")
            continue
        say(progress, f"exporting {fmt} {quant} (its peak memory measured from outside) ...")
        before = memory.load()
        got = memory.measure([sys.executable, "-m", "pocketvlm", "export", str(model), "--to", fmt, "--quant",
                              quant, "--out", str(out), "--force"],
                             on_line=lambda line: _echo(progress, line))
        if got["rc"] != 0:
            last = [line for line in got["stderr"].splitlines() if line.strip()][-1:] or ["no output"]
            raise PocketVLMError(f"exporting {fmt} {quant} failed: {last[0]}")
        rows.append({"format": fmt, "quant": quant, "wall_s": got["wall_s"], "peak_rss": got["peak_rss"],
                     "x_fp32": got["peak_rss"] / weights, "size": memory.size_on_disk(out),
                     # the phase names a path inside WORK: shown relative, so tables do not carry this machine's paths
                     "peak_phase": max(got["phases"], key=lambda p: p["peak_rss"])["phase"].replace(f"{work}/", ""),
                     "load_before": before, "load_after": memory.load()})
    return model, artifacts, {"fp32_weight_bytes": weights, "rows": rows}


def _echo(progress: bool, line: str) -> None:
    """An exporter's own progress line, indented; its progress bars (redrawn with \\r) are not repeated."""
    if progress and "%|" not in line:
        print(f"    {line}", file=sys.stderr, flush=True)


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"pocketvlm: {message}", file=sys.stderr, flush=True)


def run(work: Path, *, preset: str, variants: list[tuple[str, str]], image: Path, sizes: list[int] | None,
        runs: int, warmup: int, max_tokens: int, threads: int | None, reuse: bool, progress: bool) -> dict:
    from .bench import bench

    work.mkdir(parents=True, exist_ok=True)
    load_before = memory.load()
    started = time.time()
    model, artifacts, exports = build(work, preset, variants, reuse=reuse, progress=progress)
    from pocketvlm.prompt import ProcessorConfig

    config = ProcessorConfig.from_dir(model)
    sizes = sizes or default_sizes(config)
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    shutil.copy(image, images / image.name)
    results = bench([str(model), *(str(a) for _, a in artifacts)], images_dir=images, runs=runs, warmup=warmup,
                    max_tokens=max_tokens, threads=threads, cloud=None, out=work / "bench", progress=progress,
                    image_sizes=sizes, force=True)  # WORK is this study's own: its bench folder is an earlier run's
    return {"preset": preset, "model": str(model), "image": image.name, "sizes": sizes, "threads": threads,
            "default_size": config.longest_edge, "exports": exports, "results": results,
            "load_before": load_before, "load_after": memory.load(), "wall_s": time.time() - started}


# ---------------------------------------------------------------------------------------------- the tables

def _tiles(row) -> int | None:
    return round(row["image_tiles"]["median"]) if row.get("image_tiles") else None


def _bandwidth_range(results: dict) -> str:
    """The spread of the bandwidth measured beside each variant (each row's roofline divides by its own)."""
    seen = [v["memory_bandwidth_gbs"] for v in results["variants"] if v.get("memory_bandwidth_gbs")]
    return f" (beside each row: {min(seen):.1f}-{max(seen):.1f})" if seen else ""


def _median(row, key):
    return row[key]["median"] if row.get(key) else None


def rss_target(row) -> float | None:
    if not row["size_bytes"] or row["backend"] == "reference" or _tiles(row) is None:
        return None
    factor, extra = RSS_ONE_TILE if _tiles(row) <= 1 else RSS_MANY_TILES
    return factor * row["size_bytes"] + extra


def judge(run_info: dict) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for each of the issue's targets; None: not measured in this run."""
    from .report import summarize

    rows = [r for r in summarize(run_info["results"]) if not r["error"]]
    quantized = [r for r in rows if WIDTH.get(r["quant"])]
    one = [r for r in quantized if _tiles(r) == 1 and _median(r, "ttft_s") is not None]
    verdicts = []
    if one:
        w = max(one, key=lambda r: _median(r, "ttft_s"))
        b = min(one, key=lambda r: _median(r, "ttft_s"))
        verdicts.append((f"one tile: every 8-bit and 4-bit TTFT ≤ {ONE_TILE_TTFT_S} s",
                         f"slowest {w['variant']} {_median(w, 'ttft_s'):.2f} s",
                         all(_median(r, "ttft_s") <= ONE_TILE_TTFT_S for r in one)))
        verdicts.append((f"one tile: the best TTFT ≤ {BEST_ONE_TILE_TTFT_S} s",
                         f"{b['variant']} {_median(b, 'ttft_s'):.2f} s", _median(b, "ttft_s") <= BEST_ONE_TILE_TTFT_S))
    else:
        verdicts.append(("one tile: TTFT", "no one-tile run", None))
    for width, share in ROOFLINE_MIN.items():
        mine = [r for r in one if WIDTH[r["quant"]] == width]
        known = [r for r in mine if r.get("roofline_fraction")]
        label = f"decode ≥ {share:.0%} of the memory roofline, {width}-bit"
        if not mine:
            verdicts.append((label, f"no {width}-bit variant with a one-tile run", None))
            continue
        if not known:
            verdicts.append((label, "no roofline (weight bytes per token or bandwidth unknown)", None))
            continue
        w = min(known, key=lambda r: r["roofline_fraction"])
        missing = f"; unknown for {', '.join(r['variant'] for r in mine if r not in known)}" if len(known) < len(mine) \
            else ""
        verdicts.append((label, f"lowest {w['variant']} {w['roofline_fraction']:.0%}{missing}",
                         all(r["roofline_fraction"] >= share for r in known)))
    for label, group in ((f"peak RSS at one tile ≤ {RSS_ONE_TILE[0]}× size + 200 MB", one),
                         (f"peak RSS at many tiles ≤ {RSS_MANY_TILES[0]}× size + 200 MB",
                          [r for r in quantized if (_tiles(r) or 0) > 1])):
        judged = [r for r in group if r["peak_rss_bytes"] and rss_target(r)]
        if not judged:
            verdicts.append((label, "not measured", None))
            continue
        w = max(judged, key=lambda r: r["peak_rss_bytes"] / rss_target(r))
        verdicts.append((label, f"closest {w['variant']} {w['peak_rss_bytes'] / MB:.0f} of {rss_target(w) / MB:.0f} MB",
                         all(r["peak_rss_bytes"] <= rss_target(r) for r in judged)))
    ex = run_info["exports"]["rows"]
    label = f"export peak RSS ≤ {memory.EXPORT_TARGET}× the fp32 weights"
    if ex:
        w = max(ex, key=lambda r: r["x_fp32"])
        verdicts.append((label, f"highest {w['format']} {w['quant']} {w['x_fp32']:.2f}×",
                         all(r["x_fp32"] <= memory.EXPORT_TARGET for r in ex)))
    else:
        verdicts.append((label, "not measured (exports reused)", None))
    full = run_info["default_size"]
    ref = [r for r in rows if r["backend"] == "reference" and r["image_size"] == full and _median(r, "ttft_s")]
    best = [r for r in quantized if r["image_size"] == full and _median(r, "ttft_s")]
    label = f"default budget ({full} px): best TTFT ≤ {DEFAULT_TTFT_VS_REFERENCE}× the reference's"
    if ref and best:
        b = min(best, key=lambda r: _median(r, "ttft_s"))
        ratio = _median(b, "ttft_s") / _median(ref[0], "ttft_s")
        verdicts.append((label, f"{b['variant']} {_median(b, 'ttft_s'):.2f} s / {_median(ref[0], 'ttft_s'):.2f} s "
                                f"= {ratio:.2f}×", ratio <= DEFAULT_TTFT_VS_REFERENCE))
    else:
        verdicts.append((label, f"not measured (no {full} px run of the reference and a variant)", None))
    return verdicts


def _f(value, spec=".2f", unit=""):
    return "–" if value is None else f"{value:{spec}}{unit}"


def _pct(share):
    return "–" if share is None else f"{100 * share:.0f}%"


def tables(run_info: dict, command: str) -> str:
    from .report import summarize

    results = run_info["results"]
    device = results["devices"][0]
    engines = ", ".join(f"{k} {v}" for k, v in sorted((device.get("engines") or {}).items()) if v)
    s = results["settings"]
    lines = [f"Device: {device.get('cpu', '?')}, {device.get('cores', '?')} cores, "
             f"{(device.get('ram_bytes') or 0) / 2**30:.0f} GiB, {device.get('os', '?')}, "
             f"{_f(device.get('memory_bandwidth_gbs'), '.1f')} GB/s measured memory bandwidth"
             f"{_bandwidth_range(results)}; {engines}.",
             f"Model: random weights at the {run_info['preset']} shape (make-model, seed 0); image "
             f"`{run_info['image']}`; “{s['question']}”; {s['runs']} run{'s' * (s['runs'] != 1)} after "
             f"{s['warmup']} warm-up, "
             f"{s['max_tokens']} generated tokens each; threads {run_info['threads'] or 'the default'}. "
             f"Load average (1/5/15 min) {run_info['load_before']} before, {run_info['load_after']} after; "
             f"{run_info['wall_s'] / 60:.0f} min in all. Cells: medians.", "", "```sh", command, "```", "",
             "| variant | size | image px | tiles | prompt tokens | encode s | TTFT s | decode tok/s | of roofline | "
             "peak RSS | RSS target | agreement |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarize(results):
        if r["error"]:
            lines.append(f"| {r['variant']} | failed: {r['error']} |||||||||||")
            continue
        target = rss_target(r)
        over = " ✗" if target and r["peak_rss_bytes"] and r["peak_rss_bytes"] > target else ""
        size, peak = r["size_bytes"], r["peak_rss_bytes"]
        lines.append(
            f"| {r['base']} | {_f(size and size / MB, '.0f', ' MB')} | {r['image_size']} | {_f(_tiles(r), 'd')} | "
            f"{_f(_median(r, 'prompt_tokens'), '.0f')} | {_f(_median(r, 'encode_s'))} | {_f(_median(r, 'ttft_s'))} | "
            f"{_f(_median(r, 'decode_tok_s'), '.1f')} | {_pct(r.get('roofline_fraction'))} | "
            f"{_f(peak and peak / MB, '.0f', ' MB')}{over} | {_f(target and target / MB, '.0f', ' MB')} | "
            f"{_pct(r['agreement'])} |")
    ex = run_info["exports"]
    if ex["rows"]:
        lines += ["", f"Exports (fp32 weights {ex['fp32_weight_bytes'] / MB:.0f} MB; peak RSS of the whole process "
                      f"tree, sampled every {memory.SAMPLE_S * 1000:.0f} ms):", "",
                  "| export | peak RSS | × fp32 weights | where the peak is | time s | size | "
                  "load (before → after) |",
                  "|---|---|---|---|---|---|---|"]
        for r in ex["rows"]:
            lines.append(f"| {r['format']} {r['quant']} | {r['peak_rss'] / MB:.0f} MB | {r['x_fp32']:.2f} | "
                         f"{r['peak_phase'].removeprefix('pocketvlm: ')[:70]} | {r['wall_s']:.0f} | "
                         f"{r['size'] / MB:.0f} MB | {r['load_before']} → {r['load_after']} |")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for target, measured, met in judge(run_info):
        verdict = "not measured" if met is None else "met" if met else "**not met**"
        lines.append(f"| {target} | {measured} | {verdict} |")
    lines += ["", "Agreement: share of generated token positions equal to the reference's at the same budget "
                  "(random weights: near-ties everywhere, so low agreement is expected of any quant here; "
                  "`pocketvlm check` on a trained model is the fidelity measure). Roofline: memory bandwidth "
                  "(measured just before the row ran) ÷ weight bytes read per decoded token."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    from pocketvlm.cli import Parser, image_sizes_arg, thread_count

    parser = Parser(prog="python -m pocketvlm.bench_device.image_budget", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("work", type=Path, help="folder for the model, the exports and the results (created)")
    parser.add_argument("--preset", default="500m", help="model shape from make-model's presets (default 500m)")
    parser.add_argument("--variants", help="FORMAT:QUANT,... to export and bench (default: every 8-bit and 4-bit "
                                           f"export that runs here: {','.join(default_variants())})")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                        help="the picture asked about (default samples/images/red_circle.png, 320x240: one tile at "
                             "512 px, 13 at 2048 on the 500M shape)")
    parser.add_argument("--image-sizes", type=image_sizes_arg, metavar="PX,PX,...",
                        help="image budgets to sweep (default: one tile, two a side, and the model's own: "
                             "512,1024,2048 at 500M)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per variant and size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--threads", type=thread_count, help="threads per backend (default: the backend's own)")
    parser.add_argument("--reuse", action="store_true",
                        help="bench the model and exports already in WORK instead of rebuilding them")
    parser.add_argument("--doc", type=Path, help="replace the marked section of this Markdown file (docs/BENCH.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress")
    args = parser.parse_args(argv)
    command = "python -m pocketvlm.bench_device.image_budget " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--quiet")
    try:
        from pocketvlm.media import open_image
        from pocketvlm.presets import preset

        preset(args.preset)
        variants = parse_variants(args.variants if args.variants is not None else ",".join(default_variants()))
        open_image(args.image)
        if args.runs < 1 or args.warmup < 0 or args.max_tokens < 2:
            raise PocketVLMError("need --runs >= 1, --warmup >= 0 and --max-tokens >= 2 (decode speed needs 2)")
        if args.work.exists() and not args.work.is_dir():
            raise PocketVLMError(f"{args.work}: exists and is not a folder")
        if args.doc:  # checked now, not after an hour of work
            try:
                replace_section(args.doc.read_text(), "", str(args.doc))
            except (OSError, UnicodeDecodeError) as e:
                raise PocketVLMError(f"--doc {args.doc}: unreadable ({e.__class__.__name__})") from e
        info = run(args.work / args.preset, preset=args.preset, variants=variants, image=args.image,
                   sizes=args.image_sizes, runs=args.runs, warmup=args.warmup, max_tokens=args.max_tokens,
                   threads=args.threads, reuse=args.reuse, progress=not args.quiet)
        text = tables(info, command)
        write_atomically(args.work / args.preset / "table.md", text)
        if args.doc:
            plot = args.work / args.preset / "bench" / "image_budget.png"
            body = text
            if plot.is_file():
                (args.doc.parent / "img").mkdir(exist_ok=True)
                name = f"img/image_budget-{args.preset}.png"
                shutil.copy(plot, args.doc.parent / name)
                body += f"\n![TTFT and peak RSS against the image budget]({name})\n"
            write_atomically(args.doc, replace_section(args.doc.read_text(), body, str(args.doc)))
    except PocketVLMError as e:
        print(f"pocketvlm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
