"""`pocketvlm finetune`: every bad row and flag is one line before training, interrupts leave nothing, --force only
replaces pocketvlm outputs, OUT is a Hugging Face folder + a peft adapter that agree, and (slow) LoRA teaches the
micro model a new task without forgetting its own, with every export answering it as the PyTorch model does."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SAMPLES, assert_user_error, draw_image, load_json, run_cli

pytest.importorskip("peft", reason="the finetune extra (peft) is not installed")


def write_data(folder: Path, rows: list[dict] | None = None, n: int = 6) -> Path:
    """data.jsonl with n ordinary rows (pictures of two sizes, one row with two images) unless rows are given."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        draw_image(64 + 40 * i, 64, seed=i).save(folder / f"p{i}.png")
    if rows is None:
        rows = [{"image": f"p{i % 3}.png", "question": "What color is the circle?", "answer": "red"}
                for i in range(n - 1)]
        rows.append({"images": ["p0.png", "p2.png"], "question": "How many pictures?", "answer": "2", "task": "n"})
    (folder / "data.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder / "data.jsonl"


def leftovers(out: Path) -> list[Path]:
    return [out] * out.exists() + list(out.parent.glob(out.name + ".partial-*"))


# ------------------------------------------------------------------------------------------- bad data

GOOD = {"image": "p0.png", "question": "What color is the circle?", "answer": "red"}
BAD_ROWS = {
    "bad JSON": ('{"image": "p0.png", "question": "Hi?" "answer": "x"}', "not valid JSON"),
    "not an object": ('["p0.png", "Hi?", "x"]', "expected a JSON object, got list"),
    "unknown key": ({**GOOD, "anwser": "red"}, "unknown key 'anwser'"),
    "image and images": ({**GOOD, "images": ["p1.png"]}, "both 'image' and 'images'"),
    "no image": ({"question": "Hi?", "answer": "x"}, "no image"),
    "empty images": ({"images": [], "question": "Hi?", "answer": "x"}, "'images' must be a non-empty list"),
    "image not a string": ({**GOOD, "image": 3}, "'image' must be a file path"),
    "no question": ({"image": "p0.png", "answer": "x"}, "no 'question'"),
    "question not a string": ({**GOOD, "question": ["What?"]}, "'question' must be a string, got list"),
    "empty question": ({**GOOD, "question": "  "}, "empty 'question'"),
    "no answer": ({"image": "p0.png", "question": "Hi?"}, "no 'answer'"),
    "answer not a string": ({**GOOD, "answer": 3}, "'answer' must be a string, got int"),
    "empty answer": ({**GOOD, "answer": ""}, "empty 'answer'"),
    "task not a string": ({**GOOD, "task": 1}, "'task' must be a string"),
    "missing image": ({**GOOD, "image": "nope.png"}, "nope.png: no such file"),
    "image in a missing list": ({"images": ["p0.png", "gone.png"], "question": "Hi?", "answer": "x"},
                                "gone.png: no such file"),
    "not an image": ({**GOOD, "image": "junk.png"}, "not an image"),
    "truncated image": ({**GOOD, "image": "half.png"}, "corrupt or truncated"),
    "reserved token in the question": ({**GOOD, "question": "What is <image>?"}, "reserved token '<image>'"),
    "reserved token in the answer": ({**GOOD, "answer": "red<end_of_utterance>"}, "reserved token"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_one_line_naming_it_and_nothing_is_written(case, tiny_model, tmp_path):
    row, message = BAD_ROWS[case]
    data = write_data(tmp_path / "data", [GOOD, GOOD, row, GOOD])  # the bad row is line 3
    (tmp_path / "data" / "junk.png").write_bytes(b"not a picture" * 20)
    whole = (tmp_path / "data" / "p1.png").read_bytes()
    (tmp_path / "data" / "half.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    proc = run_cli("finetune", tiny_model, "--data", data, "--out", out, "--max-steps", 1, "--quiet")
    assert_user_error(proc, "data.jsonl:3: ", message)
    assert leftovers(out) == []


def test_data_file_problems_are_one_line(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_cli("finetune", tiny_model, "--data", tmp_path / "nope.jsonl", "--out", out),
                      "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("finetune", tiny_model, "--data", tmp_path / "empty", "--out", out),
                      "a folder without data.jsonl")
    blank = write_data(tmp_path / "blank", ["", "  "])
    assert_user_error(run_cli("finetune", tiny_model, "--data", blank, "--out", out), "no rows")
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    assert_user_error(run_cli("finetune", tiny_model, "--data", tmp_path / "latin1.jsonl", "--out", out),
                      "not UTF-8")
    one = write_data(tmp_path / "one", [GOOD])
    assert_user_error(run_cli("finetune", tiny_model, "--data", one, "--out", out), "too few to hold 1 out")
    assert_user_error(run_cli("finetune", tmp_path / "nomodel", "--data", one, "--out", out), "no such folder")
    assert leftovers(out) == []


BAD_FLAGS = {
    "rank 0": (["--rank", "0"], "--rank must be at least 1"),
    "rank not a number": (["--rank", "eight"], "argument --rank: invalid int value: 'eight'"),
    "negative alpha": (["--alpha", "-1"], "--alpha must be a positive number"),
    "zero lr": (["--lr", "0"], "--lr must be a positive number"),
    "nan lr": (["--lr", "nan"], "--lr must be a positive number"),
    "batch 0": (["--batch", "0"], "--batch must be at least 1"),
    "epochs 0": (["--epochs", "0"], "--epochs must be at least 1"),
    "max-steps 0": (["--max-steps", "0"], "--max-steps must be at least 1"),
    "epochs and max-steps": (["--epochs", "1", "--max-steps", "2"], "not allowed with argument"),
    "unknown target": (["--target", "everything"], "argument --target: invalid choice: 'everything'"),
    "eval split 1": (["--eval-split", "1"], "--eval-split is a fraction"),
    "threads 0": (["--threads", "0"], "--threads 0: give 1 to"),
    "unknown flag": (["--rnak", "4"], "unrecognized arguments: --rnak 4"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_a_bad_flag_is_one_line_and_nothing_is_written(case, tiny_model, tmp_path):
    flags, message = BAD_FLAGS[case]
    out = tmp_path / "out"
    proc = run_cli("finetune", tiny_model, "--data", write_data(tmp_path / "data"), "--out", out, *flags)
    assert_user_error(proc, message)
    assert leftovers(out) == []


def test_missing_data_flag_is_one_line(tiny_model, tmp_path):
    assert_user_error(run_cli("finetune", tiny_model, "--out", tmp_path / "out"),
                      "the following arguments are required: --data")


# ---------------------------------------------------------------------------------------------- OUT

def finetune_cli(base, data, out, *extra, timeout=600):
    return run_cli("finetune", base, "--data", data, "--out", out, "--max-steps", 2, "--quiet", *extra,
                   timeout=timeout)


def test_force_only_replaces_an_earlier_pocketvlm_output(tiny_model, tmp_path):
    data = write_data(tmp_path / "data")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_user_error(finetune_cli(tiny_model, data, other), "already exists and is not empty; pass --force")
    assert_user_error(finetune_cli(tiny_model, data, other, "--force"), "not a pocketvlm output")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert_user_error(finetune_cli(tiny_model, data, tiny_model, "--force"), "is the source")
    assert_user_error(finetune_cli(tiny_model, data, tmp_path / "data", "--force"), "is the source", "holds it")
    assert_user_error(finetune_cli(tiny_model, data, tmp_path, "--force"), "is the source", "holds it")

    out = tmp_path / "out"
    first = finetune_cli(tiny_model, data, out)
    assert first.returncode == 0, first.stderr
    created = load_json(out / "pocketvlm.json")["created"]
    assert_user_error(finetune_cli(tiny_model, data, out), "already exists and is not empty; pass --force")
    again = finetune_cli(tiny_model, data, out, "--force", "--seed", 1)
    assert again.returncode == 0, again.stderr
    manifest = load_json(out / "pocketvlm.json")
    assert manifest["finetune"]["recipe"]["seed"] == 1 and manifest["created"] >= created
    assert leftovers(out) == [out]


def test_out_is_a_hugging_face_folder_with_a_peft_adapter_that_agree(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import SmolVLMForConditionalGeneration

    from pocketvlm.manifest import read_manifest, verify
    from pocketvlm.runtime import open_backend

    data = write_data(tmp_path / "data", n=8)
    out = tmp_path / "out"
    proc = run_cli("finetune", tiny_model, "--data", data, "--out", out, "--max-steps", 3, "--rank", 4,
                   "--target", "both", "--lr", "0.05", "--eval-split", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "finetune" in proc.stderr and "wrote" in proc.stderr.splitlines()[-1]

    base_files = {p.name for p in tiny_model.iterdir() if p.is_file()}
    assert {p.name for p in out.iterdir() if p.is_file()} == base_files
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name

    manifest = read_manifest(out)
    verify(out, manifest)
    assert manifest["format"] == "hf" and manifest["quant"] == "fp32" and "peft" in manifest["tools"]
    record = manifest["finetune"]
    assert record["base"]["path"] == str(tiny_model.resolve()) and len(record["base"]["sha256"]) == 64
    assert record["data"]["rows"] == 8 and record["data"]["train"] == 6 and record["data"]["eval"] == 2
    assert len(record["data"]["sha256"]) == 64
    assert record["recipe"]["rank"] == 4 and record["recipe"]["target"] == "both"
    assert record["train"]["steps"] == 3 and len(record["train"]["loss_curve"]) == 3
    split = record["eval"]["eval_split"]
    assert split["before"]["n"] == split["after"]["n"] == 2 and "base_heldout" not in record["eval"]

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    # the merged weights are the base plus the adapter, as peft itself merges them
    base = SmolVLMForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    merged = load_file(out / "model.safetensors")
    changed = [k for k in merged if not torch.equal(merged[k], load_file(tiny_model / "model.safetensors")[k])]
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
    for key, tensor in merged.items():
        assert torch.allclose(tensor, expected[key], atol=1e-6), key
    # and every backend opener takes it as it takes the base
    assert open_backend(out).name == "reference"


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_model, tmp_path):
    from pocketvlm.manifest import sha256_file

    data = write_data(tmp_path / "data")
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = finetune_cli(tiny_model, data, tmp_path / name, "--seed", seed, "--eval-split", "0")
        assert proc.returncode == 0, proc.stderr
        hashes.append(sha256_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_mid_training_leaves_no_out_and_no_partial(sig, tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "finetune", str(tiny_model), "--data",
                             str(write_data(tmp_path / "data")), "--out", str(out), "--max-steps", "100000",
                             "--eval-split", "0"], stderr=subprocess.PIPE, text=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()

    def steps_counted() -> int:
        # the bar redraws at most every 0.1 s, so on a fast machine it may jump past any one count ("3/100000")
        return max((int(n) for n in re.findall(r"(\d+)/100000", "".join(seen))), default=0)

    try:
        deadline = time.time() + 240
        while steps_counted() < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert steps_counted() >= 3, "".join(seen)  # training has begun
        assert list(tmp_path.glob("out.partial-*")), "no scratch folder while training"
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # seen once, on a bare-machine CI run: say what the child printed
            pytest.fail(f"still running 120 s after {signal.Signals(sig).name}; it printed: {''.join(seen)[-1500:]}")
    finally:  # a failed assertion must not leave 100,000 steps of training running beside the rest of the suite
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), "".join(seen)
    assert "Traceback" not in "".join(seen)
    assert leftovers(out) == []


# ---------------------------------------------------------------------------- the proof, on the micro model

MICRO = SAMPLES / "micro"
DATA_SEED, HELDOUT_SEED = 3, 4  # disjoint from the micro model's own streams (1: train, 2: held-out)
# The task: the colours the micro model knows, asked for in French -- answers it has never produced (before: near
# chance, it answers in English). The recipe (docs/BENCH.md, "Fine-tuning the micro model"): LoRA on the language
# model and its output head (the new answer words), rank 16, lr 5e-3, 8 epochs of 432 rows, a third of them the
# model's own tasks so it keeps them. (Shape names over a frozen or LoRA-adapted one-layer vision tower reached only
# 66-79% in such a budget: that tower does not separate shapes; see BENCH.md.)
RECIPE = ["--target", "text", "--rank", "16", "--alpha", "32", "--lr", "5e-3", "--batch", "8", "--epochs", "8"]


@pytest.mark.slow
def test_lora_teaches_the_micro_model_french_colours_without_forgetting_and_every_export_agrees(tmp_path):
    from pocketvlm.synthetic import task_cycle, write_finetune_data, write_split

    mix = task_cycle({"french": 2, "color": 1, "count": 1, "position": 1, "number": 1})
    data = write_finetune_data(tmp_path / "data", 480, DATA_SEED, mix)
    french = write_split(tmp_path / "french", 90, HELDOUT_SEED, ("french",))
    out = tmp_path / "micro-french"
    proc = run_cli("finetune", MICRO, "--data", data, "--out", out, *RECIPE, "--quiet", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    record = load_json(out / "pocketvlm.json")["finetune"]
    split, own = record["eval"]["eval_split"], record["eval"]["base_heldout"]
    assert split["before"]["per_task"]["french"] <= 0.4, split  # near chance: it answers in English
    assert split["after"]["per_task"]["french"] >= 0.9, split
    assert own["before"]["accuracy"] >= 0.95 and own["after"]["accuracy"] >= 0.95, own  # and forgot nothing

    def graded(artifact) -> float:
        proc = run_cli("check", artifact, "--samples", french, "--max-tokens", 8, "--json", timeout=1800)
        assert proc.returncode in (0, 1), proc.stderr  # 1: a fidelity gate failed; the accuracy is still graded
        return json.loads(proc.stdout)["summary"]["accuracy"]

    pytorch = graded(out)  # an hf folder is its own reference: the merged PyTorch model's answers
    assert pytorch >= 0.9
    for fmt, quant, engine in (("gguf", "q8_0", "llama_cpp"), ("onnx", "int8", "onnxruntime"), ("mlx", "fp16", "mlx_vlm")):
        try:
            __import__(engine)
        except ImportError:
            continue  # the format's extra is not installed here; the others still run
        export = tmp_path / f"{fmt}-{quant}"
        proc = run_cli("export", out, "--to", fmt, "--quant", quant, "--out", export, "--quiet", timeout=1800)
        assert proc.returncode == 0, proc.stderr
        assert graded(export) == pytorch, (fmt, quant)
