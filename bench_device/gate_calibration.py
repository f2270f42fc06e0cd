"""Measure what `pocketvlm check` reports for every runnable format and quant on the tiny test model, so the gates in
pocketvlm/data/fidelity.json are set from numbers anyone can reproduce (and re-measured when an engine changes).

Per seed: make-model tiny (ordinary initialisation, as the tests use), export every format x quant this machine can
run, check each against its reference on the built-in probes; then the same for an *unrelated* model (the seed-0
weights shuffled within each tensor) exported as each quantized format, checked against the seed-0 reference --
the number a quantized gate must stay below, or it cannot tell "quantized" from "broken". Half precision is also
reported as worst |dlogit| in ulps of the top logit (check's worst_ulps; the near-tie budget, `_near_tie.ulps`).

    python -m pocketvlm.bench_device.gate_calibration --seeds 0 1 2 3 --out gates.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path


def shuffled_copy(model: Path, out: Path, seed: int = 1) -> Path:
    """The same folder with every weight tensor's values permuted: same shapes and scale, unrelated function."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    (out / "pocketvlm.json").unlink()
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(model / "model.safetensors")
    save_file({k: v.flatten()[torch.randperm(v.numel(), generator=generator)].reshape(v.shape).contiguous()
               for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def measure(seeds: list[int], max_tokens: int, work: Path, progress: bool, models: tuple[Path, ...] = (),
            only: tuple[str, ...] = ()) -> list[dict]:
    from pocketvlm.export import export_model
    from pocketvlm import formats
    from pocketvlm.make_model import make_model
    from pocketvlm.quantize.fidelity import check, gate

    rows = []
    # (label, model folder, whether to measure an unrelated model too): made tiny models, then any given folders
    todo = [(seed, None, seed == seeds[0]) for seed in seeds] + [(Path(m).name, Path(m), True) for m in models]
    for seed, given, with_unrelated in todo:
        model = given or make_model(work / f"tiny-{seed}", "tiny", seed=seed, progress=False)
        other = shuffled_copy(model, work / f"shuffled-{seed}") if with_unrelated else None
        for fmt in formats.EXPORT_FORMATS.values():
            if not fmt.runs_here() or (only and fmt.name not in only):
                continue
            for quant in fmt.export_quants:
                art = export_model(str(model), fmt.name, work / f"{fmt.name}-{quant}-{seed}", quant=quant,
                                   progress=False)
                report = check(art, reference=str(model), max_tokens=max_tokens)
                row = {"seed": seed, "format": fmt.name, "quant": quant, **_numbers(report)}
                rows.append(row)
                if progress:
                    print(_line(row), file=sys.stderr, flush=True)
                if other is not None and not gate(fmt.name, quant).get("greedy_match"):
                    wrong = export_model(str(other), fmt.name, work / f"{fmt.name}-{quant}-shuffled", quant=quant,
                                         progress=False)
                    report = check(wrong, reference=str(model), max_tokens=max_tokens)
                    rows.append({"seed": seed, "format": fmt.name, "quant": quant, "unrelated": True,
                                 **_numbers(report)})
                    if progress:
                        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _numbers(report: dict) -> dict:
    s = report["summary"]
    return {"greedy_match": s["greedy_match"], "kld_mean": s["kld_mean"], "kld_max": s["kld_max"],
            "top1": s["top1"], "first_max_abs_dlogit": s["first_max_abs_dlogit"], "pass": report["pass"],
            "vision_cosine_min": s.get("vision_cosine_min"), "failures": report["failures"],
            **({"worst_ulps": s["worst_ulps"]} if s.get("worst_ulps") is not None else {})}


def _line(row: dict) -> str:
    tag = f"unrelated {row['seed']}" if row.get("unrelated") else f"seed {row['seed']}"
    ulps = f"  ulps {row['worst_ulps']:.2f}" if "worst_ulps" in row else ""
    return (f"{row['format']:>5} {row['quant']:<7} {tag:<10} KLD mean {row['kld_mean']:.3g}  max {row['kld_max']:.3g}"
            f"  top-1 {row['top1']:.3f}  greedy {'same' if row['greedy_match'] else 'DIFF'}{ulps}"
            f"  {'PASS' if row['pass'] else 'FAIL'}")


def summarize(rows: list[dict]) -> str:
    """Per model (tiny: the worst over its seeds; each given folder) and format x quant, next to the gate and the
    unrelated model's figures (the numbers a gate must not reach)."""
    from pocketvlm.quantize.fidelity import gate

    def kind(row):
        return "tiny" if isinstance(row["seed"], int) else row["seed"]

    lines = [f"{'model':<8} {'format':>6} {'quant':<7} {'KLD mean':>9} {'KLD max':>9} {'top-1':>6} {'ulps':>5} | "
             f"{'gate mean':>9} {'gate max':>9} {'top-1':>6} | {'unrelated mean':>14} {'top-1':>6}"]
    for model, fmt, quant in sorted({(kind(r), r["format"], r["quant"]) for r in rows}):
        group = [r for r in rows if (kind(r), r["format"], r["quant"]) == (model, fmt, quant)]
        mine = [r for r in group if not r.get("unrelated")]
        wrong = [r for r in group if r.get("unrelated")]
        g = gate(fmt, quant)
        ulps = max((r.get("worst_ulps", math.nan) for r in mine), default=math.nan)
        lines.append(f"{model:<8} {fmt:>6} {quant:<7} {max(r['kld_mean'] for r in mine):9.3g} "
                     f"{max(r['kld_max'] for r in mine):9.3g} {min(r['top1'] for r in mine):6.3f} {ulps:5.2f} | "
                     f"{g.get('kld_mean_max', math.nan):9.3g} {g.get('kld_max_max', math.nan):9.3g} "
                     f"{g.get('top1_min', math.nan):6.3f} | "
                     + (f"{min(r['kld_mean'] for r in wrong):14.3g} {max(r['top1'] for r in wrong):6.3f}"
                        if wrong else f"{'':>14} {'':>6}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketvlm.bench_device.gate_calibration", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3],
                        help="tiny-model seeds (default 0-3; none with --model only)")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="also measure this model folder, e.g. samples/micro (the trained embedded model)")
    parser.add_argument("--formats", nargs="+", default=[], metavar="FORMAT",
                        help="only these formats (default: every one this machine runs)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per probe, as check uses (default 32)")
    parser.add_argument("--out", type=Path, help="write every measurement as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no per-artifact lines")
    args = parser.parse_args(argv)
    for model in args.model:
        if not (model / "config.json").is_file():
            parser.error(f"--model {model}: not a Hugging Face model folder (no config.json)")
    if not args.seeds and not args.model:
        parser.error("nothing to measure: give --seeds, --model or both")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    from pocketvlm import formats

    for name in args.formats:
        if name not in formats.EXPORT_FORMATS or not formats.EXPORT_FORMATS[name].runs_here():
            runnable = sorted(n for n, f in formats.EXPORT_FORMATS.items() if f.runs_here())
            parser.error(f"--formats {name}: not a format this machine runs ({', '.join(runnable)})")
    if args.out and (args.out.is_dir() or not args.out.parent.is_dir()):
        parser.error(f"--out {args.out}: give a file path in an existing folder")
    from pocketvlm.errors import PocketVLMError

    try:
        with tempfile.TemporaryDirectory(prefix="pocketvlm-gates-") as work:
            rows = measure(args.seeds, args.max_tokens, Path(work), progress=not args.quiet,
                           models=tuple(args.model), only=tuple(args.formats))
    except PocketVLMError as e:
        print(f"pocketvlm: {e}", file=sys.stderr)
        return 1
    print(summarize(rows))
    if args.out:
        args.out.write_text(json.dumps({"seeds": args.seeds, "max_tokens": args.max_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
