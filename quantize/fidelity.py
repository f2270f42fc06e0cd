"""`pocketvlm check`: how faithfully an artifact reproduces the PyTorch reference on the same requests.

Per sample: the artifact's free-running greedy tokens against the reference's (exact match, and how many leading
tokens agree), then -- teacher-forced on the reference's tokens so both see the same context at every step --
KL(reference || artifact) and top-1 agreement per step; and, for samples with images, the vision encoder's own
fidelity: the cosine similarity of each tile's image features to the reference's. Gates per format and quant live
in data/fidelity.json.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from pocketvlm.errors import PocketVLMError
from pocketvlm.evaluate import Sample, builtin_samples, image_dir_samples, is_correct, load_samples, normalize_answer


@lru_cache(maxsize=None)
def thresholds() -> dict:
    return json.loads(resources.files("pocketvlm").joinpath("data/fidelity.json").read_text())


def gate(fmt: str, quant: str) -> dict:
    return thresholds().get(fmt, {}).get(quant, {})


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def ulp(value: float, precision: str) -> float:
    """One unit in the last place of a number of magnitude `value` in a half-precision format."""
    bits = thresholds()["_near_tie"]["mantissa_bits"][precision]
    return 2.0 ** (math.floor(math.log2(max(abs(value), 2.0 ** -24))) - bits)


def near_tie(ref_logits: np.ndarray, artifact_logits: np.ndarray, precision: str | None) -> tuple[float, float, bool]:
    """(the reference's top-2 gap, the largest gap rounding can swap, whether this step is such a near-tie).

    A half-precision pipeline leaves each logit within a few units in the last place (ulps) of its magnitude
    (data/fidelity.json `_near_tie.ulps`). Two logits each off by at most that can swap order only when their gap
    is under twice it; so a step is a near-tie when the artifact's logits there are within the rounding budget of
    the reference's and the reference's top-2 gap is under twice the budget. An artifact noisier than its
    precision's rounding never gets the allowance."""
    top2 = np.sort(ref_logits.astype(np.float64))[-2:]
    gap = float(top2[1] - top2[0])
    if precision is None:
        return gap, 0.0, False
    budget = thresholds()["_near_tie"]["ulps"] * ulp(float(np.abs(top2).max()), precision)
    error = float(np.abs(ref_logits - artifact_logits[: len(ref_logits)]).max())
    return gap, 2 * budget, gap < 2 * budget and error <= budget


def tile_cosines(reference: np.ndarray, artifact: np.ndarray) -> np.ndarray:
    """Cosine similarity of each tile's image features ([tiles, image_seq_len, hidden], all of a tile's tokens as
    one vector) between the reference and an artifact."""
    if reference.shape != artifact.shape:
        raise PocketVLMError(f"the artifact's vision encoder gives image features of shape {artifact.shape}, the "
                             f"reference's {reference.shape}; the artifact does not match its source")
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = artifact.reshape(len(artifact), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)


def vision_fidelity(reference, backend, request) -> np.ndarray | None:
    """Per-tile cosines of the request's image features (None without images): the vision encoder's own error,
    before the text model mixes it with everything else. Each backend computes the features exactly as its
    prefill does (Backend.image_features)."""
    ref_enc, enc = reference.processor.encode(request), backend.processor.encode(request)
    if ref_enc.pixel_values is None:
        return None
    if enc.pixel_values is None or enc.pixel_values.shape != ref_enc.pixel_values.shape:
        raise PocketVLMError("the artifact's processor tiles this request differently from the reference's; "
                             "pass the same --image-size to both")
    return tile_cosines(reference.image_features(ref_enc), backend.image_features(enc))


def compare(reference, backend, samples: list[Sample], max_tokens: int = 32, progress=None,
            precision: str | None = None) -> dict:
    """Run every sample through both backends; per-sample and overall numbers. `precision` (fp16, bf16): the
    half-precision format the artifact computes in, whose near-ties are reported rather than counted against
    it."""
    rows = []
    cosines = []
    for sample in samples:
        vision = vision_fidelity(reference, backend, sample.request)
        if vision is not None:
            cosines.append(vision)
        ref = reference.run(sample.request, max_tokens, ignore_eos=True, with_logits=True)
        free = backend.run(sample.request, max_tokens, ignore_eos=True)
        forced = list(backend.generate(sample.request, max_tokens, with_logits=True, force=ref.token_ids))
        klds, top1, decided, ulps = [], [], [], []
        for ref_logits, step in zip(ref.logits, forced):
            p, q = _log_softmax(ref_logits), _log_softmax(step.logits[: len(ref_logits)])
            klds.append(float((np.exp(p) * (p - q)).sum()))
            if precision:  # how far off, in the rounding unit the near-tie budget is counted in
                error = float(np.abs(ref_logits - step.logits[: len(ref_logits)]).max())
                ulps.append(error / ulp(float(np.abs(ref_logits).max()), precision))
            same = int(np.argmax(ref_logits)) == int(np.argmax(step.logits))
            top1.append(same)
            if not near_tie(ref_logits, step.logits, precision)[2]:
                decided.append(same)
        first_dlogit = float(np.abs(ref.logits[0] - forced[0].logits[: len(ref.logits[0])]).max())
        agree = next((i for i, (a, b) in enumerate(zip(ref.token_ids, free.token_ids)) if a != b),
                     min(len(ref.token_ids), len(free.token_ids)))
        margin = allowance = None  # how decided the reference was where the artifact first chose otherwise
        within = False
        if ref.token_ids != free.token_ids and agree < len(ref.logits):
            # teacher-forced step `agree` saw the same context as the free run's diverging step
            margin, allowance, within = near_tie(ref.logits[agree], forced[agree].logits, precision)
        rows.append({
            "sample": sample.name,
            "question": sample.request.question,
            "greedy_match": ref.token_ids == free.token_ids,
            "matching_prefix": agree,
            "divergence_margin": margin,
            "divergence_allowance": allowance if precision else None,
            "divergence_at_near_tie": within,
            "tokens": len(ref.token_ids),
            "first_max_abs_dlogit": first_dlogit,
            "worst_ulps": max(ulps) if ulps else None,
            "kld_mean": float(np.mean(klds)),
            "kld_max": float(np.max(klds)),
            "top1": float(np.mean(top1)),
            "top1_decided": float(np.mean(decided)) if decided else 1.0,
            "near_tie_steps": len(top1) - len(decided),
            "vision_tiles": 0 if vision is None else len(vision),
            "vision_cosine_min": None if vision is None else float(vision.min()),
            "vision_cosine_mean": None if vision is None else float(vision.mean()),
            # what a user would read: the tokens were generated past end-of-answer for a fixed-length comparison
            "reference_answer": reference.answer_text(ref.token_ids),
            "answer": (answer := backend.answer_text(free.token_ids)),
            **({"expected": sample.answer, "correct": is_correct(answer, sample.answer)}
               if sample.answer is not None else {}),
        })
        if progress:
            progress(rows[-1])
    steps = [r["tokens"] for r in rows]
    decided_steps = [r["tokens"] - r["near_tie_steps"] for r in rows]
    diverged = [r for r in rows if not r["greedy_match"]]
    summary = {
        "greedy_match": not diverged,
        "divergences_at_near_ties": bool(diverged) and all(r["divergence_at_near_tie"] for r in diverged),
        "divergence_margin_max": max((r["divergence_margin"] for r in rows if r["divergence_margin"] is not None),
                                     default=0.0),
        "kld_mean": float(np.average([r["kld_mean"] for r in rows], weights=steps)),
        "kld_max": max(r["kld_max"] for r in rows),
        "first_max_abs_dlogit": max(r["first_max_abs_dlogit"] for r in rows),
        # worst teacher-forced |dlogit| in ulps of that step's top logit (half precision only; budget: _near_tie.ulps)
        "worst_ulps": max((r["worst_ulps"] for r in rows if r["worst_ulps"] is not None), default=None),
        "top1": float(np.average([r["top1"] for r in rows], weights=steps)),
        "top1_decided": (float(np.average([r["top1_decided"] for r in rows], weights=decided_steps))
                         if sum(decided_steps) else 1.0),
        "near_tie_steps": sum(r["near_tie_steps"] for r in rows),
        "precision": precision,
        # every tile of every sample: the worst tile, and the mean over tiles
        "vision_tiles": sum(len(c) for c in cosines),
        "vision_cosine_min": float(min(c.min() for c in cosines)) if cosines else None,
        "vision_cosine_mean": float(np.concatenate(cosines).mean()) if cosines else None,
    }
    if any("correct" in r for r in rows):
        graded = [r for r in rows if "correct" in r]
        summary["accuracy"] = sum(r["correct"] for r in graded) / len(graded)
    return {"samples": rows, "summary": summary}


def verdict(summary: dict, limits: dict) -> list[str]:
    """The gates a summary fails (empty: passes). A half-precision export (limits' `precision`) is judged on the
    steps its rounding can decide: greedy divergences and top-1 disagreements at the reference's near-ties are
    reported (notes()), not failed."""
    failures = []
    half = limits.get("precision") is not None
    if limits.get("greedy_match") and not summary["greedy_match"]:
        if not (half and summary.get("divergences_at_near_ties")):
            failures.append(f"greedy tokens differ from the reference where its top-2 logit gap was "
                            f"{summary.get('divergence_margin_max', float('nan')):.3g}"
                            + (f" (not a near-tie within {limits['precision']} rounding)" if half else ""))
    if "kld_mean_max" in limits and summary["kld_mean"] > limits["kld_mean_max"]:
        failures.append(f"mean KLD {summary['kld_mean']:.3g} > {limits['kld_mean_max']:g}")
    if "kld_max_max" in limits and summary["kld_max"] > limits["kld_max_max"]:
        failures.append(f"max KLD {summary['kld_max']:.3g} > {limits['kld_max_max']:g}")
    top1 = summary.get("top1_decided", summary["top1"]) if half else summary["top1"]
    if "top1_min" in limits and top1 < limits["top1_min"]:
        failures.append(f"top-1 agreement {top1:.3f} < {limits['top1_min']:g}"
                        + (" (steps its rounding decides)" if half else ""))
    cosine = summary.get("vision_cosine_min")
    if "vision_cosine_min" in limits and cosine is not None and cosine < limits["vision_cosine_min"]:
        failures.append(f"vision features: worst tile's cosine similarity {cosine:.4f} < "
                        f"{limits['vision_cosine_min']:g}")
    return failures


def notes(summary: dict, limits: dict) -> list[str]:
    """What a passing half-precision export did differently, said plainly."""
    if limits.get("precision") is None:
        return []
    out = []
    if not summary["greedy_match"] and summary.get("divergences_at_near_ties"):
        out.append(f"greedy tokens differ at reference near-ties (top-2 gap {summary['divergence_margin_max']:.3g}, "
                   f"within {limits['precision']} rounding of the logits): reported, not failed")
    if summary.get("near_tie_steps"):
        out.append(f"{summary['near_tie_steps']} teacher-forced step(s) were near-ties within "
                   f"{limits['precision']} rounding and are left out of top-1 agreement")
    return out


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
          images_dir: Path | None = None, max_tokens: int = 32, progress=None, image_size: int | None = None) -> dict:
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
    backend = open_backend(artifact, image_size=image_size)
    # the reference tiles as the artifact does: the same image budget (the artifact's own unless given)
    ref_backend = open_backend(ref_source, image_size=image_size or backend.processor.config.longest_edge)
    if ref_backend.name != "reference":
        raise PocketVLMError(f"--reference {ref_source} is an exported artifact; pass the Hugging Face model folder")
    limits = gate(manifest["format"], manifest["quant"])
    report = compare(ref_backend, backend, samples, max_tokens, progress, precision=limits.get("precision"))
    failures = verdict(report["summary"], limits)
    return {"artifact": str(artifact), "format": manifest["format"], "quant": manifest["quant"],
            "vision_weights": backend.vision_weights, "reference": str(ref_source), "max_tokens": max_tokens,
            "image_size": backend.processor.config.longest_edge, **report, "thresholds": limits,
            "pass": not failures, "failures": failures, "notes": notes(report["summary"], limits)}


def render(report: dict) -> str:
    """A short human table of a check report. `vision`: the worst tile's cosine similarity of the image features to
    the reference's ("-" for a sample without images)."""
    s = report["summary"]
    graded = "accuracy" in s  # the samples carry expected answers: one more column, right or wrong

    def cosine(value):
        return f"{value:>8.5f}" if value is not None else f"{'-':>8}"

    lines = [f"{report['format']} {report['quant']}  vs reference {report['reference']}  "
             f"(first-step max |Δlogit| {s['first_max_abs_dlogit']:.2e}; vision encoder "
             f"{report.get('vision_weights', '?')})",
             f"{'sample':<10} {'greedy':>7} {'prefix':>7} {'KLD mean':>10} {'KLD max':>10} {'top-1':>6} "
             f"{'vision':>8}" + ("  accuracy" if graded else "")]
    for r in report["samples"]:
        answer = ""
        if "correct" in r:
            got, expected = normalize_answer(r["answer"]), normalize_answer(r["expected"])
            answer = "  right" if r["correct"] else f"  WRONG ({got!r}, expected {expected!r})"
        lines.append(f"{r['sample'][:10]:<10} {('same' if r['greedy_match'] else 'DIFF'):>7} "
                     f"{r['matching_prefix']:>3}/{r['tokens']:<3} {r['kld_mean']:>10.2e} {r['kld_max']:>10.2e} "
                     f"{r['top1']:>6.3f} {cosine(r.get('vision_cosine_min'))}{answer}")
    acc = f"  {s['accuracy']:.1%}" if graded else ""
    lines.append(f"{'all':<10} {('same' if s['greedy_match'] else 'DIFF'):>7} {'':>7} {s['kld_mean']:>10.2e} "
                 f"{s['kld_max']:>10.2e} {s['top1']:>6.3f} {cosine(s.get('vision_cosine_min'))}{acc}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    lines.append("PASS" if report["pass"] else "FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)
