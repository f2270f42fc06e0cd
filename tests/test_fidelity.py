"""`pocketvlm check` and teacher forcing: zero on the reference itself, and it catches a perturbed model."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import SAMPLES, assert_user_error, draw_image, load_json, run_cli

from pocketvlm.prompt import Request
from pocketvlm.quantize.fidelity import verdict


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
    summary = {"greedy_match": False, "divergence_margin_max": 0.02, "kld_mean": 0.05, "kld_max": 0.4, "top1": 0.8}
    assert verdict(summary, {}) == []
    assert len(verdict(summary, {"greedy_match": True, "kld_mean_max": 0.01, "kld_max_max": 0.1,
                                 "top1_min": 0.9})) == 4
    assert verdict(summary, {"kld_mean_max": 0.1, "top1_min": 0.8}) == []
    # a divergence at a reference near-tie is tolerated only within the allowance
    assert verdict(summary, {"greedy_match": True, "greedy_tie_margin": 0.05}) == []
    assert verdict({**summary, "divergence_margin_max": 0.3}, {"greedy_match": True, "greedy_tie_margin": 0.05})


def test_check_errors_are_one_line(tiny_model, tmp_path):
    assert_user_error(run_cli("check", tmp_path), "not a pocketvlm artifact")
    (tmp_path / "s.json").write_text("{}")
    assert_user_error(run_cli("check", tiny_model, "--samples", tmp_path / "s.json"), "expected a JSON list")
    assert_user_error(run_cli("check", tiny_model, "--images", tmp_path / "none"), "no such folder")
    assert_user_error(run_cli("check", tiny_model, "--max-tokens", 0), "--max-tokens")
