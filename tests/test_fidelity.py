"""`pocketvlm check` and teacher forcing: zero on the reference itself, and it catches a perturbed model."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import SAMPLES, assert_user_error, draw_image, load_json, run_cli

from pocketvlm.prompt import Request
import pytest

from pocketvlm.quantize.fidelity import near_tie, notes, verdict


def test_teacher_forcing_on_own_tokens_reproduces_the_free_run(reference):
    request = Request("What is it?", images=[draw_image(seed=7)])
    free = reference.run(request, 10, ignore_eos=True, with_logits=True)
    forced = list(reference.generate(request, 99, with_logits=True, force=free.token_ids))
    assert [s.token_id for s in forced] == free.token_ids
    for a, b in zip(free.logits, forced):
        np.testing.assert_allclose(a, b.logits, atol=1e-5)


def test_teacher_forcing_feeds_the_forced_tokens(reference):
    request = Request("What is it?", images=[draw_image(seed=7)])
    free = reference.run(request, 6, ignore_eos=True, with_logits=True)
    other = [(t + 1) % 300 for t in free.token_ids]
    forced = list(reference.generate(request, 6, with_logits=True, force=other))
    assert len(forced) == 6
    np.testing.assert_allclose(forced[0].logits, free.logits[0], atol=1e-5)  # same context at step 1
    assert np.abs(forced[1].logits - free.logits[1]).max() > 1e-3  # step 2 saw a different token


def test_check_of_the_reference_against_itself_is_exact(tiny_model, tmp_path):
    proc = run_cli("check", tiny_model, "--max-tokens", 8, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pass"] and report["summary"]["greedy_match"]
    assert report["summary"]["kld_max"] == 0.0 and report["summary"]["top1"] == 1.0
    assert {r["sample"] for r in report["samples"]} == {"circle", "squares", "video", "text"}
    assert "PASS" in proc.stdout


def test_check_grades_answers_when_the_samples_have_them(tmp_path):
    """Samples with expected answers get an accuracy column (per sample right/WRONG, overall %)."""
    heldout = SAMPLES / "heldout"
    items = load_json(heldout / "questions.json")[:4]
    samples = [{**item, "image": str(heldout / item["image"])} for item in items]
    samples[1]["answer"] = "not-an-answer"  # one expectation no answer can meet
    (tmp_path / "s.json").write_text(json.dumps(samples))
    proc = run_cli("check", SAMPLES / "micro", "--samples", tmp_path / "s.json", "--max-tokens", 8,
                   "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["correct"] for r in report["samples"]] == [True, False, True, True]
    assert report["summary"]["accuracy"] == 0.75
    header = next(line for line in proc.stdout.splitlines() if line.startswith("sample"))
    assert header.endswith("accuracy")
    assert proc.stdout.count("  right") == 3 and "expected 'not-an-answer'" in proc.stdout
    assert proc.stdout.splitlines()[-2].endswith("75.0%")


def test_check_catches_a_perturbed_model(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from pocketvlm.manifest import write_manifest

    bent = tmp_path / "bent"
    shutil.copytree(tiny_model, bent)
    weights = load_file(bent / "model.safetensors")
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key] = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, bent / "model.safetensors", metadata={"format": "pt"})
    write_manifest(bent, format="hf", quant="fp32", source={"id": "bent"}, tools={})
    proc = run_cli("check", bent, "--reference", tiny_model, "--max-tokens", 8, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["pass"] and report["summary"]["kld_mean"] > 1e-4
    assert report["summary"]["first_max_abs_dlogit"] > 1e-3


def test_verdict_applies_each_gate():
    summary = {"greedy_match": False, "divergences_at_near_ties": False, "divergence_margin_max": 0.02,
               "kld_mean": 0.05, "kld_max": 0.4, "top1": 0.8, "top1_decided": 0.8}
    assert verdict(summary, {}) == []
    assert len(verdict(summary, {"greedy_match": True, "kld_mean_max": 0.01, "kld_max_max": 0.1,
                                 "top1_min": 0.9})) == 4
    assert verdict(summary, {"kld_mean_max": 0.1, "top1_min": 0.8}) == []
    # a half-precision export: divergences and disagreements at near-ties within its rounding are reported, not
    # failed; anywhere else they fail
    half = {"greedy_match": True, "precision": "fp16", "top1_min": 1.0}
    tie = {**summary, "divergences_at_near_ties": True, "top1_decided": 1.0, "near_tie_steps": 2}
    assert verdict(tie, half) == []
    assert len(notes(tie, half)) == 2 and "reported, not failed" in notes(tie, half)[0]
    assert verdict(summary, half)  # a divergence that is not a near-tie
    assert verdict({**tie, "top1_decided": 0.97}, half)  # a disagreement where rounding decides
    assert verdict(tie, {"greedy_match": True, "top1_min": 1.0})  # a full-precision export gets no allowance
    assert notes(tie, {"greedy_match": True}) == []


def test_near_tie_is_derived_from_the_precision():
    """ulp(5.0) in fp16 is 2^-8; with a rounding budget of B ulps (data/fidelity.json), a gap under 2B ulps with the
    artifact's logits within B ulps is a near-tie; a wider gap, or a noisier artifact, is not. bf16 (7 mantissa
    bits) allows 8x more at the same magnitude."""
    from pocketvlm.quantize.fidelity import thresholds

    b = thresholds()["_near_tie"]["ulps"]
    u = 2.0 ** -8
    ref = np.array([0.0, 5.0, 5.0 - (2 * b - 1) * u], dtype=np.float32)
    art = ref + np.array([0.0, -(b - 1) * u, (b - 1) * u], dtype=np.float32)
    gap, allowance, tie = near_tie(ref, art, "fp16")
    assert gap == pytest.approx((2 * b - 1) * u) and allowance == pytest.approx(2 * b * u) and tie
    assert not near_tie(ref, art, None)[2]
    wide = np.array([0.0, 5.0, 5.0 - (2 * b + 1) * u], dtype=np.float32)
    assert not near_tie(wide, wide, "fp16")[2] and near_tie(wide, wide, "bf16")[2]
    noisy = ref + np.array([(b + 1) * u, 0.0, 0.0], dtype=np.float32)  # off by more than the budget elsewhere
    assert not near_tie(ref, noisy, "fp16")[2]


def test_check_errors_are_one_line(tiny_model, tmp_path):
    assert_user_error(run_cli("check", tmp_path), "not a pocketvlm artifact")
    (tmp_path / "s.json").write_text("{}")
    assert_user_error(run_cli("check", tiny_model, "--samples", tmp_path / "s.json"), "expected a JSON list")
    assert_user_error(run_cli("check", tiny_model, "--images", tmp_path / "none"), "no such folder")
    assert_user_error(run_cli("check", tiny_model, "--max-tokens", 0), "--max-tokens")


# ------------------------------------------------------------ half precision: one near-tie rule for all

@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory):
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("two-shapes")
    img = Image.new("RGB", (211, 149), (240, 240, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 30, 90, 100), fill=(200, 40, 40))
    d.rectangle((120, 50, 190, 120), fill=(40, 60, 200))
    img.save(folder / "two.png")
    (folder / "samples.json").write_text(json.dumps([{"image": "two.png", "question": "Describe the image."}]))
    return folder / "samples.json"


@pytest.mark.parametrize("fmt,quant,engine", [("mlx", "fp16", "mlx_vlm"), ("gguf", "f16", "llama_cpp"),
                                              ("onnx", "fp16", "onnxruntime")])
def test_half_precision_exports_of_an_ordinary_model_pass_the_same_rule(tiny_model, two_shapes, tmp_path, fmt,
                                                                         quant, engine):
    pytest.importorskip(engine)
    out = tmp_path / f"{fmt}-{quant}"
    proc = run_cli("export", tiny_model, "--to", fmt, "--quant", quant, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("check", out, "--samples", two_shapes, "--report", tmp_path / "r.json")
    report = load_json(tmp_path / "r.json")
    assert report["thresholds"]["precision"] == "fp16" and report["summary"]["precision"] == "fp16"
    assert proc.returncode == 0 and report["pass"], proc.stdout + proc.stderr
    for row in report["samples"]:  # any divergence it passed with was a near-tie within fp16 rounding
        assert row["greedy_match"] or (row["divergence_at_near_tie"]
                                       and row["divergence_margin"] < row["divergence_allowance"])


def test_a_half_precision_export_noisier_than_its_rounding_fails(tiny_model, two_shapes, tmp_path):
    """The allowance is no loophole: the same MLX fp16 export with noise of a tenth of the weights' mean magnitude
    added to its output head (some 200 times fp16's rounding) fails."""
    pytest.importorskip("mlx_vlm")
    from safetensors.numpy import load_file, save_file

    from pocketvlm.manifest import read_manifest, write_manifest

    out = tmp_path / "mlx-fp16"
    assert run_cli("export", tiny_model, "--to", "mlx", "--quant", "fp16", "--out", out, "--quiet").returncode == 0
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    head = next(k for k in tensors if k.endswith("lm_head.weight"))
    rng = np.random.default_rng(0)
    w = tensors[head].astype(np.float32)
    tensors[head] = (w + rng.normal(0, 0.1 * float(np.abs(w).mean()), w.shape)).astype(tensors[head].dtype)
    save_file(tensors, weights, metadata={"format": "mlx"})
    m = read_manifest(out)
    (out / "pocketvlm.json").unlink()
    write_manifest(out, **{k: m[k] for k in ("format", "quant", "source", "tools")})
    proc = run_cli("check", out, "--samples", two_shapes, "--report", tmp_path / "r.json")
    report = load_json(tmp_path / "r.json")
    assert proc.returncode == 1 and not report["pass"], proc.stdout
