"""MLX path on Linux CPU (mlx[cpu]): export every quant, load with plain mlx-vlm, run, check against the reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import assert_user_error, draw_image, load_json, run_cli

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'pocketvlm[mlx]')")
pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (pip install 'pocketvlm[mlx]')")

from pocketvlm.prompt import Request  # noqa: E402
from pocketvlm.runtime import open_backend  # noqa: E402


@pytest.fixture(scope="module")
def mlx_exports(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    out = {}
    for quant in ("fp32", "fp16", "bf16", "8bit", "4bit"):
        proc = run_cli("export", tiny_model, "--to", "mlx", "--quant", quant, "--out", root / quant, "--quiet")
        assert proc.returncode == 0, proc.stderr
        out[quant] = root / quant
    return out


def check(artifact, tiny_model, tmp_path):
    report = tmp_path / f"{artifact.name}.json"
    proc = run_cli("check", artifact, "--reference", tiny_model, "--report", report)
    return proc, json.loads(report.read_text())


@pytest.mark.parametrize("quant", ["fp32", "fp16"])
def test_unquantized_exports_reproduce_the_reference_greedy_tokens(mlx_exports, tiny_model, tmp_path, quant):
    proc, report = check(mlx_exports[quant], tiny_model, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["summary"]["greedy_match"] and report["max_tokens"] == 32
    assert all(r["matching_prefix"] == 32 for r in report["samples"])
    assert {r["sample"] for r in report["samples"]} >= {"circle", "video", "text"}


@pytest.mark.parametrize("quant", ["bf16", "8bit", "4bit"])
def test_lower_precision_exports_report_their_cost_and_pass_their_gates(mlx_exports, tiny_model, tmp_path, quant):
    proc, report = check(mlx_exports[quant], tiny_model, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = report["summary"]
    assert s["kld_mean"] > 0 and 0 < s["top1"] <= 1  # real numbers, not an exact copy
    assert report["thresholds"] and report["pass"]


def test_quantized_layers_have_scales_and_sizes_shrink(mlx_exports):
    sizes = {q: sum(f["bytes"] for f in load_json(p / "pocketvlm.json")["files"] if f["path"].endswith(".safetensors"))
             for q, p in mlx_exports.items()}
    assert sizes["4bit"] < sizes["8bit"] < sizes["fp16"] < sizes["fp32"]
    for quant, bits in (("8bit", 8), ("4bit", 4)):
        info = load_json(mlx_exports[quant] / "pocketvlm.json")["quantization"]
        assert info["bits"] == bits and info["group_size"] == 64
        assert info["quantized_vision_layers"] > 0  # vision quantized by default
        weights = mx.load(str(mlx_exports[quant] / "model.safetensors"))
        for layer in range(2):
            prefix = f"language_model.layers.{layer}."
            for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
                assert prefix + proj + ".scales" in weights, (quant, proj)
        assert "language_model.lm_head.scales" in weights


def test_keep_vision_leaves_the_vision_tower_unquantized(tiny_model, tmp_path):
    out = tmp_path / "8bit-kv"
    proc = run_cli("export", tiny_model, "--to", "mlx", "--quant", "8bit", "--keep-vision", "fp16", "--out", out)
    assert proc.returncode == 0, proc.stderr
    weights = mx.load(str(out / "model.safetensors"))
    assert not any(k.startswith(("vision_model.", "connector.")) and k.endswith(".scales") for k in weights)
    assert any(k.startswith("language_model.") and k.endswith(".scales") for k in weights)
    assert weights["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == mx.float16
    assert load_json(out / "pocketvlm.json")["quantization"]["quantized_vision_layers"] == 0


def test_output_is_a_plain_mlx_vlm_folder_with_the_same_prompt(mlx_exports):
    from mlx_vlm import load
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    from pocketvlm.prompt import Processor

    model, processor = load(str(mlx_exports["fp16"]))
    image = draw_image(200, 150)
    prompt = apply_chat_template(processor, model.config, "What color is the circle?", num_images=1)
    theirs = prepare_inputs(processor, images=[image], prompts=prompt,
                            image_token_index=model.config.image_token_index)
    ours = Processor(mlx_exports["fp16"]).encode(Request("What color is the circle?", images=[image]))
    assert np.array(theirs["input_ids"])[0].tolist() == ours.input_ids.tolist()
    np.testing.assert_array_equal(np.array(theirs["pixel_values"]), ours.pixel_values)
    assert model.language_model.layers[0].self_attn.rope.base == 100000


def test_backend_tokens_timings_and_linux_note(mlx_exports, reference):
    backend = open_backend(mlx_exports["fp32"])
    request = Request("Where is the circle?", images=[draw_image(seed=3)])
    assert backend.prompt_token_ids(request) == reference.prompt_token_ids(request)
    result = backend.run(request, 8, ignore_eos=True)
    assert result.token_ids == reference.run(request, 8, ignore_eos=True).token_ids
    t = result.timings
    assert t.load_s > 0 and t.encode_s > 0 and t.ttft_s > 0 and t.decode_tok_s > 0 and t.prefill_tok_s > 0
    assert result.peak_memory_bytes > 0
    info = backend.describe()
    assert info["backend"] == "mlx" and info["quant"] == "fp32"
    assert "not what Apple Silicon users see" in info.get("note", "")


def test_ask_runs_on_an_mlx_artifact(mlx_exports, image_file):
    proc = run_cli("ask", mlx_exports["4bit"], "What is it?", "--image", image_file, "--max-tokens", 5, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "mlx"


def test_quantize_an_fp16_artifact_to_4bit(mlx_exports, tiny_model, tmp_path):
    out = tmp_path / "q4"
    proc = run_cli("quantize", mlx_exports["fp16"], "--quant", "4bit", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = load_json(out / "pocketvlm.json")
    assert manifest["format"] == "mlx" and manifest["quant"] == "4bit"
    assert manifest["derived_from"]["quant"] == "fp16"
    assert manifest["source"]["path"] == str(tiny_model)
    proc, report = check(out, tiny_model, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_user_error(run_cli("quantize", out, "--quant", "8bit", "--out", tmp_path / "again"),
                      "is 4bit; quantize from an fp16 or fp32 or bf16 mlx export")


def test_missing_rope_theta_is_filled_in(tiny_model, tmp_path):
    """transformers 5 may write only rope_parameters; mlx-vlm would silently use 1e6."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model, src)
    (src / "pocketvlm.json").unlink()
    config = load_json(src / "config.json")
    del config["text_config"]["rope_theta"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert run_cli("export", src, "--to", "mlx", "--quant", "fp32", "--out", out).returncode == 0
    assert load_json(out / "config.json")["text_config"]["rope_theta"] == 100000.0
    proc, report = check(out, src, tmp_path)
    assert proc.returncode == 0 and report["summary"]["greedy_match"]


def test_export_errors_are_one_line_and_leave_nothing(tiny_model, tmp_path):
    def export(*extra, out=tmp_path / "out"):
        return run_cli("export", tiny_model, "--to", "mlx", "--out", out, *extra)

    assert_user_error(export("--quant", "8bit", "--group-size", "128"),
                      "group size 128 does not divide", "intermediate_size", "--group-size 32 or 64")
    assert_user_error(export("--quant", "8bit", "--group-size", "48"), "32, 64 or 128")
    assert_user_error(export("--quant", "fp16", "--group-size", "32"), "apply to 8bit/4bit")
    assert_user_error(export("--quant", "3bit"), "unknown --quant '3bit' for mlx")
    assert_user_error(export("--quant", "fp16", "--llama-cpp-dir", tmp_path), "--llama-cpp-dir does not apply to mlx")
    assert_user_error(run_cli("export", tiny_model, "--to", "tflite", "--out", tmp_path / "x"), "unknown format")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert_user_error(export(out=tmp_path / "full"), "already exists and is not empty")
    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    (tied / "pocketvlm.json").unlink()
    config = load_json(tied / "config.json")
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("export", tied, "--to", "mlx", "--out", tmp_path / "t"), "tied word embeddings")
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert not leftovers and not (tmp_path / "out").exists() and not (tmp_path / "t").exists()


def test_group_size_32_quantizes_what_64_cannot(tiny_model, tmp_path):
    out = tmp_path / "g32"
    proc = run_cli("export", tiny_model, "--to", "mlx", "--quant", "4bit", "--group-size", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    info = load_json(out / "pocketvlm.json")["quantization"]
    assert info["group_size"] == 32 and info["kept_float"] == {}


def test_a_folder_mlx_vlm_cannot_load_is_one_line(mlx_exports, tmp_path):
    from pocketvlm.manifest import write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(mlx_exports["fp16"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # not a safetensors file
    manifest = load_json(broken / "pocketvlm.json")
    write_manifest(broken, format="mlx", quant="fp16", source=manifest["source"], tools=manifest["tools"])
    assert_user_error(run_cli("ask", broken, "What?", "--max-tokens", 2), "mlx-vlm cannot load this folder")
    (broken / "model.safetensors").unlink()  # a missing shard, caught by the manifest
    assert_user_error(run_cli("ask", broken, "What?"), "model.safetensors is missing")
