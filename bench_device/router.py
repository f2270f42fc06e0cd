"""`pocketvlm bench router`: where should the threshold be? Sweep --min-confidence on a labelled set.

Every question is answered once on the device (answer, right or wrong, confidence by every statistic in
pocketvlm.router.STATISTICS, latency) and once by the fallback (answer, right or wrong, cost, latency); each
threshold then routes the questions whose device confidence is below it to the cloud's answer. Per threshold:
accuracy, share escalated, $ per 1k queries, p50/p95 latency. The report names the threshold that reaches a target
accuracy at least cost, how well each confidence statistic separates the device's right answers from its wrong ones
(AUROC), and whether escalated questions are the ones the device gets wrong more often than the kept ones.

A cloud that fails (after the client's own retries, or past --fallback-timeout) is asked nothing more; every
question is still answered on the device, and results.json and report.md keep those answers and say the cloud leg
failed (in our own words: results files keep nothing a server wrote). Without the cloud's answers there is no
sweep; the CLI then exits 2 with one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pocketvlm.errors import PocketVLMError

from . import report

DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a random right answer > score of a random wrong one), ties counted half; None without both."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(model: str, fallback, samples, *, max_tokens: int = 8, threads: int | None = None,
            image_size: int | None = None, progress: bool = True, ask=None) -> tuple[list[dict], str | None]:
    """One row per sample: the device's answer and every confidence statistic, and the cloud's answer; and the
    cloud's failure (CloudError.plain), None when it answered every question. After a failure the cloud is not
    asked again (a dead endpoint would cost the timeout per question), and the rows left have no cloud fields."""
    from tqdm import tqdm

    from pocketvlm.evaluate import is_correct
    from pocketvlm.router import STATISTICS, _png, answer_probs
    from pocketvlm.runtime import open_backend

    from . import cloud as cloud_api

    ask = ask or cloud_api.ask
    backend = open_backend(model, threads=threads, image_size=image_size)
    eos = backend.processor.eos_token_ids
    provider = fallback.provider
    rows, failed = [], None
    for s in tqdm(samples, desc="router sweep", unit="q", disable=not progress, file=sys.stderr):
        device = backend.run(s.request, max_tokens)
        probs = answer_probs(device.token_ids, device.token_probs, eos)
        row = {"sample": s.name, "question": s.request.question, "expected": s.answer,
               "device_answer": device.answer, "device_correct": is_correct(device.answer, s.answer),
               "device_s": device.timings.total_s,
               "confidence": {name: (float(f(probs)) if probs else 0.0) for name, f in STATISTICS.items()}}
        rows.append(row)
        if failed:
            continue
        try:
            reply = ask(provider, fallback.key, s.request.question, [_png(i) for i in s.request.images or []],
                        max_tokens, **fallback.ask_options())
        except cloud_api.CloudError as e:
            failed = e.plain
            continue
        row.update(cloud_answer=reply.text.strip(), cloud_correct=is_correct(reply.text, s.answer),
                   cloud_s=reply.total_s,
                   cloud_cost_usd=(provider.cost(reply.prompt_tokens, reply.completion_tokens)
                                   if reply.prompt_tokens is not None and reply.completion_tokens is not None
                                   else None))
    return rows, failed


def sweep(rows: list[dict], thresholds, statistic: str, target_accuracy: float | None) -> dict:
    table = []
    for t in thresholds:
        escalated = [r["confidence"][statistic] < t for r in rows]
        correct = [r["cloud_correct"] if e else r["device_correct"] for r, e in zip(rows, escalated)]
        latency = [r["device_s"] + (r["cloud_s"] if e else 0.0) for r, e in zip(rows, escalated)]
        costs = [(r["cloud_cost_usd"] or 0.0) if e else 0.0 for r, e in zip(rows, escalated)]
        table.append({"threshold": t, "accuracy": sum(correct) / len(rows), "escalated": sum(escalated) / len(rows),
                      "usd_per_1k": 1000 * sum(costs) / len(rows),
                      "p50_s": _quantile(latency, 0.5), "p95_s": _quantile(latency, 0.95)})
    best = None
    if target_accuracy is not None:
        reaching = [r for r in table if r["accuracy"] >= target_accuracy]
        best = min(reaching, key=lambda r: (r["usd_per_1k"], r["escalated"]), default=None)
    return {"statistic": statistic, "table": table, "target_accuracy": target_accuracy, "best": best}


def separation(rows: list[dict]) -> dict:
    """How each confidence statistic separates the device's right answers from its wrong ones (AUROC), and the
    device's error rate among escalated vs kept questions at the default threshold."""
    right = [r["device_correct"] for r in rows]
    return {name: auroc([r["confidence"][name] for r in rows], right) for name in rows[0]["confidence"]}


def _separation_lines(results: dict) -> list[str]:
    lines = ["", "Confidence statistics (AUROC: how well each separates the device's right answers from its wrong "
                 "ones; 0.5 is chance):", ""]
    return lines + [f"- `{name}`: {('–' if v is None else f'{v:.3f}')}" for name, v in results["separation"].items()]


def markdown(results: dict) -> str:
    s = results["sweep"]
    title = f"# Router sweep: {report.md(results['model'])} on the device, {report.md(results['fallback'])} when unsure"
    if s is None:  # the cloud leg failed: the device's answers only
        return "\n".join([title, "", f"{results['questions']} labelled questions ({report.md(results['samples'])}). "
                          f"Device alone: {100 * results['device_accuracy']:.1f}%.", "",
                          f"**The cloud leg failed** ({report.md(results['cloud_error'])}): no threshold sweep "
                          f"without the cloud's answers. The device's answers and confidences are in results.json.",
                          *_separation_lines(results)]) + "\n"
    lines = [title, "",
             f"{results['questions']} labelled questions ({report.md(results['samples'])}); confidence = the "
             f"`{s['statistic']}` of the answer tokens' probabilities. Device alone: "
             f"{100 * results['device_accuracy']:.1f}% · cloud alone: {100 * results['cloud_accuracy']:.1f}%.", "",
             "| min confidence | accuracy | escalated | $ / 1k queries | p50 s | p95 s |", "|---|---|---|---|---|---|"]
    for r in s["table"]:
        mark = " **(best)**" if s["best"] and s["best"]["threshold"] == r["threshold"] else ""
        lines.append(f"| {r['threshold']:g}{mark} | {100 * r['accuracy']:.1f}% | {100 * r['escalated']:.1f}% | "
                     f"{r['usd_per_1k']:.4f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} |")
    lines += _separation_lines(results)
    best = s["best"]
    lines += ["", (f"Least cost reaching {100 * s['target_accuracy']:.0f}%: min confidence {best['threshold']:g} "
                   f"({100 * best['accuracy']:.1f}%, {100 * best['escalated']:.1f}% escalated, "
                   f"${best['usd_per_1k']:.4f} / 1k)") if best else
              (f"No threshold reaches {100 * s['target_accuracy']:.0f}%." if s["target_accuracy"] else "")]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    if results["sweep"] is None:  # no cloud answers: nothing to plot against cost
        return None
    table = results["sweep"]["table"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["usd_per_1k"] for r in table], [100 * r["accuracy"] for r in table], marker="o")
    for r in table:
        ax.annotate(f"{r['threshold']:g}", (r["usd_per_1k"], 100 * r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -8))
    ax.axhline(100 * results["device_accuracy"], color="#4c72b0", linestyle=":", label="device alone")
    ax.axhline(100 * results["cloud_accuracy"], color="#c44e52", linestyle="--", label="cloud alone")
    ax.set_xlabel("USD per 1k queries")
    ax.set_ylabel("accuracy, %")
    ax.set_title("Router: accuracy against cost, per --min-confidence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "router.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(model: str, fallback, *, samples_file: Path | None = None, thresholds=DEFAULT_THRESHOLDS,
        target_accuracy: float | None = 0.95, max_tokens: int = 8, out: Path | None = None,
        threads: int | None = None, image_size: int | None = None, progress: bool = True, ask=None,
        force: bool = False) -> dict:
    from pocketvlm.evaluate import heldout_file, load_samples
    from pocketvlm.router import DEFAULT_STATISTIC

    path = Path(samples_file) if samples_file else heldout_file()
    samples = load_samples(path)
    if not samples or any(s.answer is None for s in samples):
        raise PocketVLMError(f"{path}: the router sweep needs questions with expected answers ('answer')")
    inputs = [model, path, *dict.fromkeys(p for s in samples for p in s.image_paths)]
    if out:
        report.check_out(out, force=force, inputs=inputs)
    rows, failed = measure(model, fallback, samples, max_tokens=max_tokens, threads=threads, image_size=image_size,
                           progress=progress, ask=ask)
    results = {"schema": "pocketvlm.router/1", "model": str(model), "fallback": fallback.provider.model,
               "fallback_url": fallback.provider.base_url, "samples": str(path), "questions": len(rows),
               "device_accuracy": sum(r["device_correct"] for r in rows) / len(rows),
               "cloud_error": failed,
               "cloud_accuracy": None if failed else sum(r["cloud_correct"] for r in rows) / len(rows),
               "sweep": None if failed else sweep(rows, thresholds, DEFAULT_STATISTIC, target_accuracy),
               "separation": separation(rows), "rows": rows}
    if out:
        report.write_folder(out, results, markdown(results), lambda folder: plot(results, folder), force=force,
                            inputs=inputs)
    return results


def error_rates(rows: list[dict], threshold: float, statistic: str) -> tuple[float | None, float | None]:
    """The device's error rate among the questions a threshold escalates, and among those it keeps."""
    esc = [not r["device_correct"] for r in rows if r["confidence"][statistic] < threshold]
    kept = [not r["device_correct"] for r in rows if r["confidence"][statistic] >= threshold]
    def rate(xs):
        return sum(xs) / len(xs) if xs else None

    return rate(esc), rate(kept)
