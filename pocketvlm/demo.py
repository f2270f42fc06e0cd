"""`pocketvlm demo`: the embedded micro model through every format and quant this machine can produce.

Export each variant, ask the held-out questions through every backend that runs here, and print one table —
format x quant x size x accuracy x agreement with the reference x TTFT x decode speed — plus the edge-vs-cloud
line. The full report (report.md, results.json, plots) goes to a folder named at the end.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

from .errors import PocketVLMError
from .jsonfile import dumps
from .manifest import read_manifest

def embedded_model() -> Path:
    path = Path(str(resources.files("pocketvlm.samples") / "micro"))
    if not (path / "pocketvlm.json").is_file():
        raise PocketVLMError(f"the embedded micro model is missing ({path}); reinstall pocketvlm or pass --model")
    return path


def plan_variants(names: list[str] | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(format, quant) pairs this machine can export, and why the others are missing."""
    from pocketvlm import formats

    for name in names or ():
        formats.get(name, exportable=True)  # an unknown name is a one-line error
    variants, missing = [], {}
    for name, fmt in sorted(formats.EXPORT_FORMATS.items()):
        if names and name not in names:
            continue
        try:
            fmt.stage("export")
        except PocketVLMError as e:
            missing[name] = str(e)
            continue
        variants += [(name, q) for q in fmt.export_quants]
    return variants, missing


def _answers(backend, samples, progress_bar) -> dict:
    from .evaluate import normalize_answer

    rows = []
    for s in samples:
        r = backend.run(s.request, 8)
        rows.append({"answer": normalize_answer(r.answer), "expected": s.answer, "ttft_s": r.timings.ttft_s,
                     "decode_tok_s": r.timings.decode_tok_s})
        progress_bar.update()
    return {"rows": rows, "accuracy": sum(r["answer"] == r["expected"] for r in rows) / len(rows),
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "decode_tok_s": statistics.median([r["decode_tok_s"] for r in rows if r["decode_tok_s"]] or [0])}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_demo(model: str | None = None, out: Path | None = None, formats: list[str] | None = None,
             questions: int | None = 40, cloud: str | None = "default", progress: bool = True,
             image_size: int | None = None) -> Path:
    from tqdm import tqdm

    from pocketvlm import formats as registry
    from pocketvlm.export import export_model
    from pocketvlm.runtime import open_backend

    from .evaluate import heldout_samples

    source = model or str(embedded_model())
    samples = heldout_samples(questions)
    if not all(s.answer for s in samples):
        raise PocketVLMError("the held-out samples have no expected answers")
    if cloud:  # an unknown provider is a one-line error now, not after minutes of exports
        from pocketvlm.bench_device import cloud as cloud_api

        cloud_api.plan_cloud(cloud)
    out = Path(out or f"pocketvlm-demo-{dt.datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and any(out.iterdir()):
        raise PocketVLMError(f"{out} already exists and is not empty; pick another --out")
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    variants, missing = plan_variants(formats)
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    log(f"pocketvlm demo: {source} -> {len(variants)} variants, {len(samples)} held-out questions each")
    for fmt, why in missing.items():
        log(f"  {fmt}: skipped ({why})")

    rows = []
    bar = tqdm(total=len(variants), desc="export", unit="variant", disable=not progress, file=sys.stderr)
    artifacts = {}
    for fmt, quant in variants:
        bar.set_description(f"export {fmt} {quant}")
        path = out / "artifacts" / f"{fmt}-{quant}"
        start = time.perf_counter()
        try:
            export_model(source, fmt, path, quant=quant, progress=False)
            artifacts[(fmt, quant)] = (path, time.perf_counter() - start)
        except PocketVLMError as e:
            rows.append({"format": fmt, "quant": quant, "status": f"export failed: {e}"})
        bar.update()
    bar.close()

    runnable = [(k, v) for k, v in artifacts.items() if registry.get(k[0]).runs_here()]
    bar = tqdm(total=len(samples) * (1 + len(runnable)), desc="answer", unit="q", disable=not progress,
               file=sys.stderr)
    bar.set_description("answer reference")
    reference = _answers(open_backend(source, image_size=image_size), samples, bar)
    ref_answers = [r["answer"] for r in reference["rows"]]
    rows.insert(0, {"format": "pytorch", "quant": "fp32 (reference)", "size_bytes": _size(Path(source)),
                    "accuracy": reference["accuracy"], "agreement": 1.0, "ttft_s": reference["ttft_s"],
                    "decode_tok_s": reference["decode_tok_s"], "status": "ok"})
    notes: dict[str, str] = {}
    for (fmt, quant), (path, export_s) in artifacts.items():
        row = {"format": fmt, "quant": quant, "size_bytes": _size(path), "export_s": round(export_s, 1)}
        if (fmt, quant) not in dict(runnable):
            row["status"] = f"exported; runs only on {', '.join(registry.get(fmt).runs_on)}"
            rows.append(row)
            continue
        bar.set_description(f"answer {fmt} {quant}")
        try:
            backend = open_backend(path, image_size=image_size)
            got = _answers(backend, samples, bar)
            note = backend.describe().get("note")  # e.g. MLX on Linux: timings unlike Apple Silicon's
            if note:
                notes.setdefault(fmt, note)
        except PocketVLMError as e:
            row["status"] = f"failed: {e}"
            rows.append(row)
            continue
        row.update(accuracy=got["accuracy"], ttft_s=got["ttft_s"], decode_tok_s=got["decode_tok_s"], status="ok",
                   agreement=sum(a == b["answer"] for a, b in zip(ref_answers, got["rows"])) / len(samples))
        rows.append(row)
    bar.close()

    cloud_block = _cloud_line(cloud, samples, reference, progress) if cloud else None
    results = {"schema": "pocketvlm.demo/1", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "model": source, "questions": len(samples), "machine": f"{platform.system()} {platform.machine()}",
               "skipped_formats": missing, "notes": notes, "rows": rows, "cloud": cloud_block,
               "manifest": read_manifest(Path(source)) if Path(source).is_dir() else None}
    (out / "results.json").write_text(dumps(results) + "\n")
    table = render(results)
    (out / "report.md").write_text(table)
    _plot(results, out)
    print(table)
    log(f"pocketvlm demo: full report in {out.resolve()}/ (report.md, results.json, accuracy.png, speed.png)")
    return out


def _cloud_line(name: str, samples, reference: dict, progress: bool) -> dict:
    """The cloud block for the edge-vs-cloud line: bench's cloud leg on five held-out pictures, one run each."""
    import tempfile

    from pocketvlm.bench_device import cloud as cloud_api
    from pocketvlm.bench_device.bench import cloud_leg

    plan = cloud_api.plan_cloud(name)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, s in enumerate(samples[:5]):
            paths.append(Path(tmp) / f"q{i}.png")
            s.request.images[0].save(paths[-1])
        block = cloud_leg(plan, paths, samples[0].request.question, 1, 8)
    if progress:
        for message in (*block["notes"], block.get("error")):
            if message:
                print(f"pocketvlm demo: cloud: {message}", file=sys.stderr)
    measured = any(r.get("cost_usd") is not None for r in block["records"])
    block["per_1k_usd"] = block["prices"][0]["per_1k_usd"]["standard"]
    block["label"] = "measured" if measured else "estimated (no API key)" if block.get("skipped") else "estimated"
    if block["records"]:
        block["ttft_s"] = statistics.median(r["ttft_s"] for r in block["records"])
    return block


def _cloud_price_text(p: dict) -> str:
    """'$X per 1k such questions ($Y with the batch API)' at one price, with whose price it is."""
    batch = p["per_1k_usd"].get("batch")
    label = (f"retired {p['retired']}, last price" if p.get("status") == "retired" and p.get("retired")
             else p["label"])
    return (f"{p['name']} (`{p['model']}`; {label}, ${p['input_per_m']:.2f}/${p['output_per_m']:.2f} per M tokens "
            f"as of {p.get('date') or 'unknown'}) costs ${p['per_1k_usd']['standard']:.4f} per 1k such questions"
            + (f", ${batch:.4f} with the batch API" if batch is not None else ""))


def _fmt(v, spec, unit=""):
    return "–" if v is None else format(v, spec) + unit


def render(results: dict) -> str:
    lines = [f"# pocketvlm demo — {results['model']}", "",
             f"{results['questions']} held-out questions (synthetic: color, count, position, number), greedy, "
             f"on {results['machine']}. Agreement: same answer as the PyTorch reference.", "",
             "| format | quant | size | accuracy | agreement | TTFT | decode tok/s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        size, acc, agree = r.get("size_bytes"), r.get("accuracy"), r.get("agreement")
        lines.append(f"| {r['format']} | {r['quant']} | {_fmt(size and size / 1e6, '.2f', ' MB')}"
                     f" | {_fmt(acc if acc is None else 100 * acc, '.1f', '%')} "
                     f"| {_fmt(agree if agree is None else 100 * agree, '.1f', '%')} "
                     f"| {_fmt(r.get('ttft_s') and 1000 * r['ttft_s'], '.0f', ' ms')} "
                     f"| {_fmt(r.get('decode_tok_s'), '.0f')} | {r.get('status', '')} |")
    for fmt, note in results.get("notes", {}).items():
        lines.append(f"\n{fmt}: {note}.")
    c = results.get("cloud")
    if c:
        prices = c.get("prices") or []
        head = (_cloud_price_text(prices[0]) if prices else
                f"{c['name']} (`{c['model']}`) costs ${c['per_1k_usd']:.4f} per 1k such questions")
        others = "".join(f"; {_cloud_price_text(p)}" for p in prices[1:])
        lines += ["", f"Edge vs cloud, {c['label']}: {head}{others}. On-device answers cost no API fees."
                  + (f" Cloud TTFT {1000 * c['ttft_s']:.0f} ms." if c.get("ttft_s") else "")]
        lines += [f"Cloud: {note}." for note in c.get("notes", [])]
        if c.get("error"):
            lines.append(f"Cloud request failed: {c['error']}.")
    for fmt, why in results.get("skipped_formats", {}).items():
        lines.append(f"\n{fmt}: not on this machine ({why})")
    return "\n".join(lines) + "\n"


def _plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    labels = [f"{r['format']}\n{r['quant']}" for r in rows]
    for name, key, scale, unit in (("accuracy", "accuracy", 100, "% correct"),
                                   ("speed", "decode_tok_s", 1, "decode tokens/s")):
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
        ax.bar(range(len(rows)), [scale * (r.get(key) or 0) for r in rows], color="#4c72b0")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{name} per format and quant")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
