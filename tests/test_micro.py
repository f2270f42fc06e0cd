"""The embedded micro model: the committed held-out split regenerates exactly, the committed weights answer it, training
is deterministic, and `pocketvlm demo` produces its table and report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import SAMPLES, load_json, run_cli
from PIL import Image

from pocketvlm.synthetic import HELDOUT_SEED, TASKS, examples, task_cycle, write_split

MICRO = SAMPLES / "micro"


def test_heldout_split_regenerates_exactly(tmp_path):
    write_split(tmp_path, n=200, seed=HELDOUT_SEED)
    committed = load_json(SAMPLES / "heldout" / "questions.json")
    assert load_json(tmp_path / "questions.json") == committed
    assert {q["task"] for q in committed} == {"color", "count", "position", "number"}
    for item in committed[::17]:
        with Image.open(SAMPLES / "heldout" / item["image"]) as a, Image.open(tmp_path / item["image"]) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), item["image"]


def test_train_and_heldout_streams_do_not_overlap():
    heldout = {(e.question, e.answer, e.image.tobytes()) for e in examples(200, HELDOUT_SEED)}
    train = {(e.question, e.answer, e.image.tobytes()) for e in examples(2000, 1)}
    assert not heldout & train


def test_training_mix_weights_tasks_and_interleaves_them():
    cycle = task_cycle({"color": 1, "count": 2, "position": 1, "number": 3})
    assert cycle == ("color", "count", "position", "number", "count", "number", "number")
    assert task_cycle(None) == TASKS
    assert [e.task for e in examples(14, 1, cycle)] == list(cycle) * 2
    with pytest.raises(ValueError, match="unknown task"):
        task_cycle({"colour": 2})


# What the committed model must reach on the held-out split: the target (presets.json:
# micro.train.target_accuracy).
COMMITTED_FLOOR = 0.95


def test_committed_micro_model_answers_the_heldout_split():
    from pocketvlm.runtime.reference import ReferenceBackend
    from pocketvlm.evaluate import heldout_accuracy

    manifest = load_json(MICRO / "pocketvlm.json")
    assert manifest["source"]["id"] == "preset:micro" and manifest["quant"] == "fp16"
    assert (MICRO / "model.safetensors").stat().st_size < 5_000_000
    result = heldout_accuracy(ReferenceBackend(MICRO), 200)
    assert result["accuracy"] >= COMMITTED_FLOOR, result
    assert result["accuracy"] == pytest.approx(manifest["train"]["heldout"]["accuracy"])
    assert result["per_task"]["color"] >= 0.95 and result["per_task"]["position"] >= 0.95


def test_training_examples_keep_8_bit_pixels_that_decode_to_the_processors_exactly():
    """Large fixed training sets fit in memory: tiles are kept as uint8 codes (a quarter of float32), and decoding
    them gives the processor's float32 pixels bit for bit."""
    from pocketvlm.prompt import Processor, Request
    from pocketvlm.train import encode_examples

    processor = Processor(MICRO)
    items = examples(8, HELDOUT_SEED)
    for item, encoded in zip(items, encode_examples(processor, items)):
        assert encoded.pixels.dtype == np.uint8
        expected = processor.encode(Request(item.question, images=[item.image])).pixel_values[0, 0]
        assert np.array_equal(encoded.pixel_values(), expected)


def test_training_is_deterministic(tmp_path):
    import torch

    from pocketvlm.make_model import _build_tokenizer, _finish_config, _random_model, _write_processor_files
    from pocketvlm.presets import preset
    from pocketvlm.train import train

    p = preset("micro")
    cfg = {**p["train"], "examples": 64, "steps": 3, "batch": 8}
    states = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        tok = _build_tokenizer(p, 0)
        model = _random_model(p, tok, 0, progress=False)
        tok.save_pretrained(folder)
        _write_processor_files(folder, p)
        model.save_pretrained(folder)
        _finish_config(folder / "config.json", p)
        record = train(model, folder, cfg, seed=0, progress=False)
        states.append((record["final_loss"], {k: v.clone() for k, v in model.state_dict().items()}))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(states[0][1][k], states[1][1][k]) for k in states[0][1])


def test_demo_prints_the_table_and_writes_the_report(tmp_path):
    pytest.importorskip("mlx_vlm", reason="the demo run here exports MLX; mlx-vlm is not installed")
    out = tmp_path / "demo"
    proc = run_cli("demo", "--questions", 10, "--formats", "mlx", "--out", out, "--cloud", "mistral-medium-3",
                   env={"MISTRAL_API_KEY": ""}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "| format | quant | size | accuracy | agreement | TTFT | decode tok/s | status |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    rows = {(r["format"], r["quant"]): r for r in results["rows"]}
    assert rows[("pytorch", "fp32 (reference)")]["accuracy"] >= 0.5
    assert rows[("mlx", "fp32")]["agreement"] == 1.0 and rows[("mlx", "fp16")]["agreement"] == 1.0
    assert {q for f, q in rows if f == "mlx"} == {"fp32", "fp16", "bf16", "8bit", "4bit"}
    assert results["cloud"]["label"] == "estimated (no API key)" and "estimated" in proc.stdout
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    assert str(out.resolve()) in proc.stderr
    if sys.platform.startswith("linux"):  # MLX timings on Linux are labelled as unlike Apple Silicon's
        assert "not what Apple Silicon users see" in proc.stdout and "mlx" in results["notes"]
