"""bench_device/ceilings: the arithmetic it divides by is the model's own (counted by torch on the real modules), its
decode graph holds exactly the text model's weight matmuls, and bad input is one line. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import assert_user_error

from pocketvlm.bench_device import ceilings
from pocketvlm.presets import preset


def run_ceilings(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketvlm.bench_device.ceilings", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_vision_arithmetic_is_what_torch_counts_on_the_model(tiny_model):
    """One tile through the tiny model's vision tower and connector, counted by torch's FlopCounterMode (matmuls,
    the patch convolution, attention), equals the formula the ceiling divides by."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.model.vision_model.set_attn_implementation("eager")
    side = model.config.vision_config.image_size
    pixels = torch.randn(1, 1, 3, side, side)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixel_values=pixels, pixel_attention_mask=torch.ones(1, 1, side, side,
                                                                                             dtype=torch.bool))
    assert ceilings.vision_flops_per_tile(preset("tiny")) == counter.get_total_flops()


def test_decode_graph_holds_the_text_models_weight_matmuls(tiny_model, tmp_path):
    """Same weight count as the model's text decoder linears plus its lm head, one MatMul per linear."""
    import onnx
    import torch
    from transformers import SmolVLMForConditionalGeneration

    path = tmp_path / "weight_matmuls.onnx"
    ceilings.weight_matmul_graph(preset("tiny"), path)
    graph = onnx.load(str(path)).graph
    ours = sorted(tuple(t.dims) for t in graph.initializer)
    model = SmolVLMForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    theirs = sorted(tuple(reversed(m.weight.shape)) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and (".text_model." in name or name == "lm_head"))
    assert ours == theirs
    assert sum(n.op_type == "MatMul" for n in graph.node) == len(theirs)


def test_it_runs_end_to_end_and_writes_its_figures(tmp_path):
    out = tmp_path / "ceilings.json"
    proc = run_ceilings("--preset", "tiny", "--threads", 1, "--runs", 2, "--work", tmp_path, "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert "| int8 |" in proc.stdout and "| q4 |" in proc.stdout and "at that rate" in proc.stdout
    assert result["vision"]["gflop_per_tile"] * 1e9 == ceilings.vision_flops_per_tile(preset("tiny"))
    assert result["vision"]["f32_gemm_gflops"] > 0 and result["vision"]["f32_s_per_tile"] > 0
    int8, q4 = result["decode"]
    assert (int8["quant"], q4["quant"]) == ("int8", "q4") and int8["bytes"] > q4["bytes"] > 0
    assert all(row["step_s"] > 0 and row["of_roofline"] > 0 for row in result["decode"])
    assert (int8["target"], q4["target"]) == (0.8, 0.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ceilings.json"]  # its graphs are gone


@pytest.mark.parametrize("args, fragment", [
    (("--preset", "9b"), "unknown preset '9b'"),
    (("--runs", "0"), "at least 1"),
    (("--threads", "-1"), "at least 1"),
    (("--work", "/nonexistent/dir"), "--work /nonexistent/dir: not a folder"),
    (("--json", "/nonexistent/dir/out.json"), "--json /nonexistent/dir: not a folder"),
])
def test_bad_input_is_one_line_before_any_work(args, fragment):
    assert_user_error(run_ceilings(*args), fragment)


def test_a_full_disk_is_one_line_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    """The graphs are ~1.5 GB at 500m: a disk that fills while one is written is a one-line error, no traceback,
    and the half-written graph goes with its temporary folder."""
    real = ceilings.weight_matmul_graph

    def fills_the_disk(p, path):
        real(p, path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ceilings, "weight_matmul_graph", fills_the_disk)
    out = tmp_path / "ceilings.json"
    assert ceilings.main(["--preset", "tiny", "--runs", "1", "--work", str(tmp_path), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pocketvlm: error: could not build or run the weight-matmul graphs in") and "\n" not in err
    assert "No space left on device" in err and "--work" in err
    assert list(tmp_path.iterdir()) == []
