"""`pocketvlm check`: how faithfully an artifact reproduces the PyTorch reference on the same requests.

Per sample: the artifact's free-running greedy tokens against the reference's (exact match, and how many leading
tokens agree), then -- teacher-forced on the reference's tokens so both see the same context at every step --
KL(reference || artifact) and top-1 agreement per step. Gates per format and quant live in data/fidelity.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from pocketvlm.errors import PocketVLMError
from pocketvlm.media import Video, image_files, open_image
from pocketvlm.prompt import Request
from pocketvlm.train import normalize_answer


@dataclass
class Sample:
    name: str
    request: Request
    answer: str | None = None


@lru_cache(maxsize=None)
def thresholds() -> dict:
    return json.loads(resources.files("pocketvlm").joinpath("data/fidelity.json").read_text())


def gate(fmt: str, quant: str) -> dict:
    return thresholds().get(fmt, {}).get(quant, {})


def builtin_samples() -> list[Sample]:
    """Drawn images, a short 'video' and a text-only question: deterministic inputs that cover every prompt path."""
    from PIL import Image, ImageDraw

    def picture(w, h, shapes):
        img = Image.new("RGB", (w, h), (245, 245, 240))
        d = ImageDraw.Draw(img)
        for kind, box, color in shapes:
            (d.ellipse if kind == "circle" else d.rectangle)(box, fill=color)
        return img

    circle = picture(320, 240, [("circle", (100, 60, 220, 180), (220, 30, 30))])
    squares = picture(480, 320, [("square", (x, 110, x + 100, 210), (30, 80, 210)) for x in (40, 190, 340)])
    frames = [picture(160, 120, [("circle", (10 + 40 * i, 40, 50 + 40 * i, 80), (20, 160, 40))]) for i in range(3)]
    clip = Video(frames=frames, indices=[0, 1, 2], fps=1.0, total_frames=3, duration=3.0)
    return [
        Sample("circle", Request("What color is the circle?", images=[circle])),
        Sample("squares", Request("How many squares are there?", images=[squares])),
        Sample("video", Request("Where does the circle move?", video=clip)),
        Sample("text", Request("Name three colors.")),
    ]


def load_samples(path: Path) -> list[Sample]:
    """A JSON list of {"image": path relative to the file, "question": ..., "answer"?: ...}."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        raise PocketVLMError(f"{path}: no such samples file") from None
    except (OSError, ValueError) as e:
        raise PocketVLMError(f"{path}: unreadable samples file ({e.__class__.__name__})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "question" in i for i in items):
        raise PocketVLMError(f"{path}: expected a JSON list of objects with a 'question'")
    samples = []
    for i, item in enumerate(items):
        images = [open_image(path.parent / item["image"])] if item.get("image") else []
        name = item.get("name") or (Path(item["image"]).stem if item.get("image") else f"#{i}")
        samples.append(Sample(name, Request(item["question"], images=images),
                              item.get("answer")))
    return samples


def image_dir_samples(folder: Path, question: str = "Describe this image.") -> list[Sample]:
    """Every image in FOLDER, each asked the same question."""
    return [Sample(p.name, Request(question, images=[open_image(p)])) for p in image_files(folder)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def compare(reference, backend, samples: list[Sample], max_tokens: int = 32, progress=None) -> dict:
    """Run every sample through both backends; per-sample and overall numbers."""
    rows = []
    for sample in samples:
        ref = reference.run(sample.request, max_tokens, ignore_eos=True, with_logits=True)
        free = backend.run(sample.request, max_tokens, ignore_eos=True)
        forced = list(backend.generate(sample.request, max_tokens, with_logits=True, force=ref.token_ids))
        klds, top1 = [], []
        for ref_logits, step in zip(ref.logits, forced):
            p, q = _log_softmax(ref_logits), _log_softmax(step.logits[: len(ref_logits)])
            klds.append(float((np.exp(p) * (p - q)).sum()))
            top1.append(int(np.argmax(ref_logits)) == int(np.argmax(step.logits)))
        first_dlogit = float(np.abs(ref.logits[0] - forced[0].logits[: len(ref.logits[0])]).max())
        agree = next((i for i, (a, b) in enumerate(zip(ref.token_ids, free.token_ids)) if a != b),
                     min(len(ref.token_ids), len(free.token_ids)))
        margin = None  # how decided the reference was where the artifact first chose otherwise
        if ref.token_ids != free.token_ids and agree < len(ref.logits):
            top2 = np.sort(ref.logits[agree].astype(np.float64))[-2:]
            margin = float(top2[1] - top2[0])
        rows.append({
            "sample": sample.name,
            "question": sample.request.question,
            "greedy_match": ref.token_ids == free.token_ids,
            "matching_prefix": agree,
            "divergence_margin": margin,
            "tokens": len(ref.token_ids),
            "first_max_abs_dlogit": first_dlogit,
            "kld_mean": float(np.mean(klds)),
            "kld_max": float(np.max(klds)),
            "top1": float(np.mean(top1)),
            # what a user would read: the tokens were generated past end-of-answer for a fixed-length comparison
            "reference_answer": reference.answer_text(ref.token_ids),
            "answer": (answer := backend.answer_text(free.token_ids)),
            **({"expected": sample.answer, "correct": normalize_answer(answer) == normalize_answer(sample.answer)}
               if sample.answer is not None else {}),
        })
        if progress:
            progress(rows[-1])
    steps = [r["tokens"] for r in rows]
    summary = {
        "greedy_match": all(r["greedy_match"] for r in rows),
        "divergence_margin_max": max((r["divergence_margin"] for r in rows if r["divergence_margin"] is not None),
                                     default=0.0),
        "kld_mean": float(np.average([r["kld_mean"] for r in rows], weights=steps)),
        "kld_max": max(r["kld_max"] for r in rows),
        "first_max_abs_dlogit": max(r["first_max_abs_dlogit"] for r in rows),
        "top1": float(np.average([r["top1"] for r in rows], weights=steps)),
    }
    if any("correct" in r for r in rows):
        graded = [r for r in rows if "correct" in r]
        summary["accuracy"] = sum(r["correct"] for r in graded) / len(graded)
    return {"samples": rows, "summary": summary}


def verdict(summary: dict, limits: dict) -> list[str]:
    """The gates a summary fails (empty: passes)."""
    failures = []
    if limits.get("greedy_match") and not summary["greedy_match"]:
        # greedy_tie_margin: a lower-precision export may flip a near-tie (reference top-2 gap below it); a
        # divergence where the reference was decided is a real difference
        tie = limits.get("greedy_tie_margin", 0.0)
        if summary.get("divergence_margin_max", float("inf")) >= tie:
            failures.append(f"greedy tokens differ from the reference where its top-2 logit gap was "
                            f"{summary.get('divergence_margin_max', float('nan')):.3g}"
                            + (f" (>= the {tie:g} near-tie allowance)" if tie else ""))
    if "kld_mean_max" in limits and summary["kld_mean"] > limits["kld_mean_max"]:
        failures.append(f"mean KLD {summary['kld_mean']:.3g} > {limits['kld_mean_max']:g}")
    if "kld_max_max" in limits and summary["kld_max"] > limits["kld_max_max"]:
        failures.append(f"max KLD {summary['kld_max']:.3g} > {limits['kld_max_max']:g}")
    if "top1_min" in limits and summary["top1"] < limits["top1_min"]:
        failures.append(f"top-1 agreement {summary['top1']:.3f} < {limits['top1_min']:g}")
    return failures


def reference_for(artifact: Path, manifest: dict, override: str | None) -> str:
    """The reference model: --reference, else the folder the artifact was exported from, else its Hub id."""
    if override:
        return override
    if manifest.get("format") == "hf":  # a make-model folder is its own reference
        return str(artifact)
    source = manifest.get("source", {})
    if source.get("path") and Path(source["path"]).is_dir():
        return source["path"]
    if source.get("id") and not str(source["id"]).startswith("preset:"):
        return source["id"]
    raise PocketVLMError(f"{artifact}: its source ({source.get('path') or source.get('id')}) is not here; "
                         f"pass --reference with the original model folder")


def check(artifact: Path, *, reference: str | None = None, samples_file: Path | None = None,
          images_dir: Path | None = None, max_tokens: int = 32, progress=None) -> dict:
    from pocketvlm.manifest import read_manifest
    from pocketvlm.runtime import open_backend

    artifact = Path(artifact)
    manifest = read_manifest(artifact) if artifact.is_dir() else None
    if manifest is None:
        raise PocketVLMError(f"{artifact}: not a pocketvlm artifact (no pocketvlm.json); export one first")
    ref_source = reference_for(artifact, manifest, reference)
    if max_tokens < 1:
        raise PocketVLMError("--max-tokens must be at least 1")
    samples = ((load_samples(samples_file) if samples_file else [])
               + (image_dir_samples(images_dir) if images_dir else [])) or builtin_samples()
    ref_backend = open_backend(ref_source)
    backend = open_backend(artifact)
    if ref_backend.name != "reference":
        raise PocketVLMError(f"--reference {ref_source} is an exported artifact; pass the Hugging Face model folder")
    report = compare(ref_backend, backend, samples, max_tokens, progress)
    limits = gate(manifest["format"], manifest["quant"])
    failures = verdict(report["summary"], limits)
    return {"artifact": str(artifact), "format": manifest["format"], "quant": manifest["quant"],
            "reference": str(ref_source), "max_tokens": max_tokens, **report, "thresholds": limits,
            "pass": not failures, "failures": failures}


def render(report: dict) -> str:
    """A short human table of a check report."""
    s = report["summary"]
    graded = "accuracy" in s  # the samples carry expected answers: one more column, right or wrong
    lines = [f"{report['format']} {report['quant']}  vs reference {report['reference']}  "
             f"(first-step max |Δlogit| {s['first_max_abs_dlogit']:.2e})",
             f"{'sample':<10} {'greedy':>7} {'prefix':>7} {'KLD mean':>10} {'KLD max':>10} {'top-1':>6}"
             + ("  accuracy" if graded else "")]
    for r in report["samples"]:
        answer = ""
        if "correct" in r:
            got, expected = normalize_answer(r["answer"]), normalize_answer(r["expected"])
            answer = "  right" if r["correct"] else f"  WRONG ({got!r}, expected {expected!r})"
        lines.append(f"{r['sample'][:10]:<10} {('same' if r['greedy_match'] else 'DIFF'):>7} "
                     f"{r['matching_prefix']:>3}/{r['tokens']:<3} {r['kld_mean']:>10.2e} {r['kld_max']:>10.2e} "
                     f"{r['top1']:>6.3f}{answer}")
    acc = f"  {s['accuracy']:.1%}" if graded else ""
    lines.append(f"{'all':<10} {('same' if s['greedy_match'] else 'DIFF'):>7} {'':>7} {s['kld_mean']:>10.2e} "
                 f"{s['kld_max']:>10.2e} {s['top1']:>6.3f}{acc}")
    lines.append("PASS" if report["pass"] else "FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)
