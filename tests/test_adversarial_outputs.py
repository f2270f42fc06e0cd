"""Hostile input on what the commands write (issue 31): an OUT that appears while a run works is never replaced
unless the rules allow it; bench report / bench router follow the output rules; every input a command reads (the
adapter's base, the training images, results files) is protected from --force; nothing written ever holds NaN."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_image, load_json, run_cli

from pocketvlm.errors import PocketVLMError
from pocketvlm.manifest import FILENAME, atomic_output, write_manifest

RACE = Path(__file__).parent / "racehook.py"
PRECIOUS = "precious.txt"


def race(mode: str, out: Path, *args, timeout=900) -> subprocess.CompletedProcess:
    """The command, with a folder appearing at OUT just before its finished output moves there (tests/racehook)."""
    return subprocess.run([sys.executable, str(RACE), mode, str(out), "--", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def debris(out: Path) -> list[str]:
    """Scratch or set-aside folders a run left beside OUT."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")) \
        if out.parent.exists() else []


def built(out: Path) -> bool:
    return (out / FILENAME).is_file()


# --------------------------------------------------------------------------------- atomic_output itself

def _build(out: Path, *, force=False, during=None):
    with atomic_output(out, force=force) as scratch:
        (scratch / "weights.bin").write_bytes(b"new")
        if during:
            during()
        write_manifest(scratch, format="hf", quant="fp32", source={"id": "t", "revision": None}, tools={})


def test_a_folder_with_files_that_appears_mid_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"

    def appear():
        out.mkdir()
        (out / PRECIOUS).write_text("mine")

    with pytest.raises(PocketVLMError, match="changed while this ran.*already exists and is not empty.*discarded"):
        _build(out, during=appear)
    assert [p.name for p in out.iterdir()] == [PRECIOUS] and debris(out) == []
    # the same with --force: a folder that is not a pocketvlm output is not replaced either
    shutil.rmtree(out)
    with pytest.raises(PocketVLMError, match="changed while this ran.*not a pocketvlm output"):
        _build(out, force=True, during=appear)
    assert [p.name for p in out.iterdir()] == [PRECIOUS] and debris(out) == []


def test_an_empty_folder_that_appears_mid_run_is_taken_as_at_the_start(tmp_path):
    out = tmp_path / "out"
    _build(out, during=lambda: out.mkdir())
    assert built(out) and (out / "weights.bin").read_bytes() == b"new" and debris(out) == []


def test_an_earlier_output_swapped_for_a_users_folder_mid_run_is_kept_even_with_force(tmp_path):
    out = tmp_path / "out"
    _build(out)

    def swap():
        shutil.rmtree(out)
        out.mkdir()
        (out / PRECIOUS).write_text("mine")

    with pytest.raises(PocketVLMError, match="not a pocketvlm output"):
        _build(out, force=True, during=swap)
    assert [p.name for p in out.iterdir()] == [PRECIOUS] and debris(out) == []


def test_a_file_or_a_link_that_appears_mid_run_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PocketVLMError, match="not a directory"):
        _build(out, during=lambda: out.write_text("a file"))
    assert out.read_text() == "a file" and debris(out) == []
    out.unlink()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / PRECIOUS).write_text("mine")
    with pytest.raises(PocketVLMError, match="symbolic link"):
        _build(out, during=lambda: out.symlink_to(target))
    assert out.is_symlink() and [p.name for p in target.iterdir()] == [PRECIOUS] and debris(out) == []


def test_force_still_replaces_an_earlier_output_that_is_unchanged(tmp_path):
    out = tmp_path / "out"
    _build(out)
    (out / "weights.bin").write_bytes(b"old")
    _build(out, force=True)
    assert (out / "weights.bin").read_bytes() == b"new" and debris(out) == []


# ------------------------------------------------------------------------------------ every command, racing

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pocketvlm.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(2):
        draw_image(64, 64, seed=i).save(folder / f"p{i}.png")
    rows = [{"image": f"p{i % 2}.png", "question": "What color is the circle?", "answer": "red"} for i in range(4)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("bench") / "run"
    proc = run_cli("bench", tiny, "--runs", 1, "--warmup", 0, "--max-tokens", 2, "--cloud", "none", "--out", out,
                   "--no-plots", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out / "results.json"


def commands(tiny, data, results_file) -> dict:
    return {
        "make-model": lambda out: ["make-model", out, "--quiet"],
        "export": lambda out: ["export", tiny, "--to", "mlx", "--quant", "fp32", "--out", out, "--quiet"],
        "finetune": lambda out: ["finetune", tiny, "--data", data, "--out", out, "--max-steps", 1, "--rank", 2,
                                 "--eval-split", 0, "--quiet"],
        "bench report": lambda out: ["bench", "report", results_file, "--out", out, "--no-plots"],
        "bench run": lambda out: ["bench", tiny, "--runs", 1, "--warmup", 0, "--max-tokens", 2, "--cloud", "none",
                                  "--out", out, "--no-plots", "--quiet"],
    }


@pytest.mark.parametrize("command", ["make-model", "export", "finetune", "bench report", "bench run"])
def test_out_appearing_mid_run_keeps_the_users_files(command, tiny, data, results_file, tmp_path):
    if command == "export":
        pytest.importorskip("mlx_vlm")
    out = tmp_path / "out"
    proc = race("files", out, *commands(tiny, data, results_file)[command](out))
    assert_user_error(proc, f"--out {out} changed while this ran", "discarded")
    assert [p.name for p in out.iterdir()] == [PRECIOUS] and (out / PRECIOUS).read_text() == "a user's file\n"
    assert debris(out) == []


def test_an_empty_out_appearing_mid_run_is_filled_and_a_swapped_one_is_kept(tiny, tmp_path):
    out = tmp_path / "out"
    proc = race("empty", out, "make-model", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert built(out) and debris(out) == []
    proc = race("swap", out, "make-model", out, "--quiet", "--force")
    assert_user_error(proc, "changed while this ran", "not a pocketvlm output")
    assert [p.name for p in out.iterdir()] == [PRECIOUS] and debris(out) == []


# ------------------------------------------------------------------------- bench report / router --out

def test_bench_report_out_follows_the_output_rules(results_file, tmp_path, monkeypatch):
    notes = tmp_path / "mynotes"
    notes.mkdir()
    (notes / "report.md").write_text("my notes")
    (notes / "results.json").write_text("{}")
    assert_user_error(run_cli("bench", "report", results_file, "--out", notes), "already exists and is not empty")
    assert_user_error(run_cli("bench", "report", results_file, "--out", notes, "--force"),
                      "not a pocketvlm output")
    assert (notes / "report.md").read_text() == "my notes" and (notes / "results.json").read_text() == "{}"
    # the working directory, and a folder holding an input, are never written
    here = tmp_path / "here"
    here.mkdir()
    (here / "report.md").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "pocketvlm", "bench", "report", str(results_file), "--out", "."],
                          capture_output=True, text=True, cwd=here, timeout=300)
    assert_user_error(proc, "is the working directory")
    assert [p.name for p in here.iterdir()] == ["report.md"]
    a = tmp_path / "a"
    a.mkdir()
    shutil.copy(results_file, a / "results.json")
    (a / "bad.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    for force in ([], ["--force"]):
        assert_user_error(run_cli("bench", "report", a / "results.json", a / "bad.json", "--out", a, *force),
                          "is the source", "holds it")
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    # an earlier report is ours: --force replaces it, and without --force it is kept
    merged = tmp_path / "merged"
    assert run_cli("bench", "report", results_file, "--out", merged, "--no-plots").returncode == 0
    assert load_json(merged / FILENAME)["format"] == "report"
    assert_user_error(run_cli("bench", "report", results_file, "--out", merged), "pass --force")
    assert run_cli("bench", "report", results_file, results_file, "--out", merged, "--no-plots",
                   "--force").returncode == 0
    assert len(load_json(merged / "results.json")["variants"]) == 2 and debris(merged) == []


def test_bench_run_and_router_out_refuse_before_any_work(tiny, tmp_path):
    notes = tmp_path / "mynotes"
    notes.mkdir()
    (notes / "report.md").write_text("my notes")
    proc = run_cli("bench", tiny, "--cloud", "none", "--out", notes, "--force")
    assert_user_error(proc, "not a pocketvlm output")
    assert_user_error(run_cli("bench", tiny, "--cloud", "none", "--out", tiny), "is the source")
    router = ["bench", "router", tiny, "--fallback", "openai-compatible", "--fallback-base-url",
              "http://127.0.0.1:9/v1"]
    assert_user_error(run_cli(*router, "--out", notes), "already exists and is not empty")
    assert_user_error(run_cli(*router, "--out", tiny, "--force"), "is the source")
    samples = tmp_path / "samples"
    samples.mkdir()
    draw_image().save(samples / "x.png")
    (samples / "q.json").write_text(json.dumps([{"image": "x.png", "question": "Color?", "answer": "red"}]))
    assert_user_error(run_cli(*router, "--samples", samples / "q.json", "--out", samples, "--force"),
                      "is the source", "holds it")
    assert (notes / "report.md").read_text() == "my notes" and sorted(p.name for p in samples.iterdir()) == [
        "q.json", "x.png"]


# ------------------------------------------------------------------------------- bench report's inputs

def _results(**changes) -> dict:
    base = {"schema": "pocketvlm.bench/2", "devices": [{"id": "phone", "cpu": "a", "cores": 8}],
            "variants": [{"id": "gguf-q4", "device": "phone", "backend": "gguf", "quant": "q4_k_m"}],
            "records": [{"variant": "gguf-q4", "device": "phone", "ttft_s": 0.5, "decode_tok_s": 20.0}],
            "cloud": [], "settings": {"question": "q", "images": ["x.png"], "runs": 1}}
    return {**base, **changes}


MALFORMED = {
    "NaN": ('{"schema": "pocketvlm.bench/2", "devices": [], "records": [{"variant": "v", "device": "d", '
            '"ttft_s": NaN}]}', "NaN is not a number JSON allows"),
    "Infinity": ('{"schema": "pocketvlm.bench/2", "costs": {"power_w": Infinity}}', "Infinity is not a number"),
    "devices not a list": (_results(devices={"id": "x"}), "devices is dict, not a list"),
    "device without id": (_results(devices=[{"cpu": "x"}]), "devices[0].id is missing"),
    "variant id a number": (_results(variants=[{"id": 3, "device": "phone"}]), "variants[0].id is 3"),
    "metric a string": (_results(records=[{"variant": "v", "device": "d", "ttft_s": "fast"}]),
                        "records[0].ttft_s"),
    "metric a bool": (_results(records=[{"variant": "v", "device": "d", "ttft_s": True}]), "records[0].ttft_s"),
    "cloud price a string": (_results(cloud=[{"price": {"input_per_m": "1.5"}}]), "cloud[0].price"),
    "cost rows not a list": (_results(costs={"rows": 5}), "costs.rows is int"),
    "notes not strings": (_results(cloud=[{"notes": [1]}]), "cloud[0].notes[0]"),
    "not an object": ("[1, 2]", "not a pocketvlm bench results file"),
    "deeply nested": ("[" * 100000 + "]" * 100000, "unreadable results file"),
    "a folder": (None, "a folder, not a results file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_results_are_one_line_and_nothing_is_written(case, results_file, tmp_path):
    content, message = MALFORMED[case]
    bad = tmp_path / "bad.json"
    if content is None:
        bad.mkdir()
    else:
        bad.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "merged"
    assert_user_error(run_cli("bench", "report", results_file, bad, "--out", out), message)
    assert not out.exists() and debris(out) == []


def test_a_merged_file_with_only_some_cloud_fields_is_reported(results_file, tmp_path):
    partial = tmp_path / "phone.json"
    partial.write_text(json.dumps(_results(cloud=[{"name": "cloud", "model": "m", "records": [{"ttft_s": 0.4}]}])))
    proc = run_cli("bench", "report", results_file, partial, "--out", tmp_path / "out", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert "- measured: TTFT 0.40 s" in (tmp_path / "out" / "report.md").read_text()


def test_device_labels_cannot_break_or_inject_into_the_report(tmp_path):
    label = "a|b\n# Heading <script>alert(1)</script> [x](javascript:alert(1)) `code` ![i](http://x/i.png)"
    results = _results(devices=[{"id": label, "cpu": "x|y", "os": "<b>os</b>", "accelerator": "\r\n|"}],
                       variants=[{"id": label, "device": label, "error": "boom | <img src=x>"}],
                       records=[], cloud=[{"name": "**c**", "model": "m`|x", "notes": ["## n", "<i>"],
                                           "error": "e\n| x |"}])
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps(results))
    out = tmp_path / "out"
    proc = run_cli("bench", "report", bad, "--out", out, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    for raw in ("<script>", "<b>", "<img", "<i>", "](javascript:", "![i]", "\n# Heading", "\n## n", "`code`"):
        assert not re.search(r"(?<!\\)" + re.escape(raw), text), raw  # present only backslash-escaped
    lines = text.splitlines()
    for title, header_start in (("## Devices", "| id |"), ("## Edge (measured)", "| device | variant |")):
        header = next(i for i, line in enumerate(lines) if line.startswith(header_start))
        row = lines[header + 2]  # the one row under the separator: as many cells as the header, on one line
        assert unescaped_pipes(row) == unescaped_pipes(lines[header]), (title, row)
    assert "a\\|b \\# Heading \\<script\\>" in text


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_no_json_output_holds_nan_or_infinity(tmp_path):
    from pocketvlm.bench_device import report
    from pocketvlm.jsonfile import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5, {"c": float("-inf")}]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5, {"c": None}]}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the output"))
    results = _results(records=[{"variant": "gguf-q4", "device": "phone", "ttft_s": math.nan}])
    report.write(results, tmp_path / "out", with_plots=False)
    assert load_json(tmp_path / "out" / "results.json")["records"][0]["ttft_s"] is None


# ------------------------------------------------------------------- inputs are protected like the source

@pytest.fixture(scope="module")
def tuned(tiny, data, tmp_path_factory):
    """A one-step fine-tune of the module's own tiny model: OUT with the merged model and OUT/adapter."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("tuned") / "out"
    proc = run_cli("finetune", tiny, "--data", data, "--out", out, "--max-steps", 1, "--rank", 2, "--eval-split", 0,
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_of_an_adapter_never_replaces_the_base_it_names(tuned, tiny, tmp_path):
    before = tree(tiny)
    for fmt in ("mlx", "gguf"):
        assert_user_error(run_cli("export", tuned / "adapter", "--to", fmt, "--out", tiny, "--force"),
                          "is the source")
        assert_user_error(run_cli("export", tuned / "adapter", "--to", fmt, "--out", tuned, "--force"),
                          "is the source")
    assert tree(tiny) == before and built(tuned)


def test_finetune_force_never_deletes_the_training_images(tiny, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    first = tmp_path / "first"
    first.mkdir()
    draw_image(64, 64).save(first / "p.png")
    (first / "data.jsonl").write_text(json.dumps({"image": "p.png", "question": "Color?", "answer": "red"}) + "\n")
    assert run_cli("finetune", tiny, "--data", first / "data.jsonl", "--out", out, "--max-steps", 1, "--rank", 2,
                   "--eval-split", 0, "--quiet").returncode == 0
    (out / "pics").mkdir()
    draw_image(64, 64, seed=3).save(out / "pics" / "mine.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": str(out / "pics" / "mine.png"), "question": "Color?", "answer": "red"})
                    + "\n")
    before = tree(out)
    assert_user_error(run_cli("finetune", tiny, "--data", data, "--out", out, "--force", "--max-steps", 1,
                              "--eval-split", 0, "--quiet"), "is the source", "mine.png", "holds it")
    assert tree(out) == before


def test_an_adapter_without_a_verifiable_base_is_refused(tuned, tiny, tmp_path):
    pytest.importorskip("mlx_vlm")
    copied = tmp_path / "copied"
    shutil.copytree(tuned / "adapter", copied)
    # copied out of its fine-tune folder: its base is still known by the base it names, here, so it is verified
    adapter = tmp_path / "adapter-mlx"
    proc = run_cli("export", copied, "--to", "mlx", "--out", adapter, "--quiet")
    assert proc.returncode == 0, proc.stderr
    recorded = load_json(adapter / FILENAME)["adapter"]["base"]["sha256"]
    assert recorded == load_json(tuned / FILENAME)["finetune"]["base"]["sha256"]
    # ... but naming a base that is not here leaves nothing to verify it by
    config = json.loads((copied / "adapter_config.json").read_text())
    (copied / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/model"}))
    assert_user_error(run_cli("export", copied, "--to", "mlx", "--out", tmp_path / "x"),
                      "cannot tell which base weights it was trained on")
    assert not (tmp_path / "x").exists()
    # a hash blanked by hand in an adapter artifact: refused when applied
    base = tmp_path / "base-mlx"
    assert run_cli("export", tiny, "--to", "mlx", "--quant", "fp32", "--out", base, "--quiet").returncode == 0
    question = ["What color?"]
    assert run_cli("ask", base, *question, "--adapter", adapter, "--max-tokens", 2).returncode == 0
    manifest = load_json(adapter / FILENAME)
    for blank in (None, "", "0" * 12):
        manifest["adapter"]["base"]["sha256"] = blank
        (adapter / FILENAME).write_text(json.dumps(manifest))
        assert_user_error(run_cli("ask", base, *question, "--adapter", adapter), "does not say which base weights")


def test_a_truncated_adapter_is_one_line(tuned, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tuned / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(run_cli("export", broken, "--to", "mlx", "--out", tmp_path / "x"), "adapter_model.safetensors",
                      "unreadable")
    weights.write_bytes(b"")
    assert_user_error(run_cli("export", broken, "--to", "gguf", "--out", tmp_path / "x"), "unreadable")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- numbers and rows

def test_a_diverging_fine_tune_stops_in_one_line_and_writes_nothing(tiny, data, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    for flags in (["--lr", "1e308"], ["--alpha", "1e300", "--lr", "1"]):
        proc = run_cli("finetune", tiny, "--data", data, "--out", out, "--max-steps", 3, "--eval-split", 0,
                       "--quiet", *flags)
        assert_user_error(proc, "training diverged", "lower --lr")
        assert not out.exists() and debris(out) == []


FINETUNE_BOUNDS = {
    "seed beyond 2**63": (["--seed", str(2 ** 80)], "--seed must be from 0 to 2**63-1"),
    "negative seed": (["--seed", "-1"], "--seed must be from 0"),
    "rank beyond the model": (["--rank", "100000"], "--rank 100000 is larger than the narrowest layer"),
    "threads beyond the cores": (["--threads", "100000"], "--threads 100000: give 1 to"),
    "epochs beyond reason": (["--epochs", str(10 ** 9)], "at most 1,000,000"),
}


@pytest.mark.parametrize("case", FINETUNE_BOUNDS)
def test_huge_finetune_numbers_are_refused_up_front(case, tiny, data, tmp_path):
    pytest.importorskip("peft")
    flags, message = FINETUNE_BOUNDS[case]
    out = tmp_path / "out"
    assert_user_error(run_cli("finetune", tiny, "--data", data, "--out", out, "--quiet", *flags), message)
    assert not out.exists()


def test_a_batch_larger_than_the_data_is_capped_to_it(tiny, data, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    proc = run_cli("finetune", tiny, "--data", data, "--out", out, "--batch", 30000, "--max-steps", 1,
                   "--eval-split", 0, "--rank", 2)
    assert proc.returncode == 0, proc.stderr
    assert "--batch 30000 is more than the 4 training rows; using 4" in proc.stderr
    assert load_json(out / FILENAME)["finetune"]["recipe"]["batch"] == 4


@pytest.mark.parametrize("line, message", [
    ("[" * 200000 + "]" * 200000, "nested too deeply"),
    ('{"image": "p0.png", "question": "q", "answer": "a", "task": ' + "9" * 5000 + "}", "unreadable JSON"),
])
def test_pathological_rows_are_one_line(line, message, tiny, data, tmp_path):
    bad = tmp_path / "data.jsonl"
    shutil.copy(data.parent / "p0.png", tmp_path / "p0.png")
    bad.write_text(line + "\n")
    assert_user_error(run_cli("finetune", tiny, "--data", bad, "--out", tmp_path / "out"), "data.jsonl:1", message)


def test_samples_files_that_say_nothing_or_the_wrong_thing_are_one_line(tiny, tmp_path):
    samples = tmp_path / "s.json"
    for content, message in (([], "no samples (an empty list)"), ([{"image": 5, "question": "q"}],
                                                                  "'image' must be a file path"),
                             ([{"image": "x.png", "question": ["q"]}], "'question' must be a string"),
                             ([{"question": "q", "answer": 3}], "'answer' must be a string")):
        samples.write_text(json.dumps(content))
        assert_user_error(run_cli("check", tiny, "--reference", tiny, "--samples", samples), message)
    report = tmp_path / "report.json"
    assert_user_error(run_cli("check", tiny, "--images", tmp_path, "--report", report), "no images")
    assert not report.exists()


# ---------------------------------------------------------------------------------------- ~user paths

def test_a_path_of_an_unknown_user_is_one_line_everywhere(tiny, data, tmp_path):
    ghost = "~nosuchuser-pocketvlm/x"
    cases = [
        ("finetune", tiny, "--data", ghost, "--out", tmp_path / "o"),
        ("finetune", tiny, "--data", data, "--out", ghost),
        ("ask", ghost, "What?"),
        ("ask", tiny, "What?", "--adapter", ghost),
        ("ask", tiny, "What?", "--image", ghost),
        ("export", ghost, "--to", "mlx", "--out", tmp_path / "o"),
        ("export", tiny, "--to", "mlx", "--out", ghost),
        ("check", ghost),
        ("bench", "report", ghost, "--out", tmp_path / "o"),
        ("make-model", ghost),
    ]
    for args in cases:
        assert_user_error(run_cli(*args), "~nosuchuser-pocketvlm", "no user")
    row = tmp_path / "rows"
    row.mkdir()
    (row / "data.jsonl").write_text(json.dumps({"image": ghost, "question": "q", "answer": "a"}) + "\n")
    assert_user_error(run_cli("finetune", tiny, "--data", row, "--out", tmp_path / "o"), "no user")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("root", ["~nosuchuser-pocketvlm/envs", "/proc/pocketvlm-envs", "A_FILE"])
def test_an_unusable_environment_root_is_one_line(root, tmp_path):
    from conftest import REPO

    if root == "A_FILE":
        root = str(tmp_path / "a-file")
        Path(root).write_text("x")
    for command in ([sys.executable, str(REPO / ".ci" / "bootstrap.py"), "ensure"],
                    ["/bin/bash", "-c", f'. "{REPO}/.ci/env.sh"']):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "POCKETVLM_ENV_ROOT": root,
                                   "POCKETVLM_PYTHON": sys.executable})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("pocketvlm: setup failed: POCKETVLM_ENV_ROOT"), proc.stderr


def test_check_report_never_writes_into_what_check_reads(tiny, tmp_path):
    weights = tiny / "model.safetensors"
    before = weights.read_bytes()
    for report, message in ((weights, "which check reads"), (tiny / "new.json", "which check reads"),
                            (tmp_path, "is a folder"), (tmp_path / "no" / "r.json", "no folder")):
        assert_user_error(run_cli("check", tiny, "--reference", tiny, "--report", report), message)
    assert weights.read_bytes() == before and not (tiny / "new.json").exists()
