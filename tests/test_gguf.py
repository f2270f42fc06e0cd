"""The GGUF path: export (llama.cpp's converter from the installed llama-cpp-python's sdist), quantize (llama.cpp's
quantizer), the llama.cpp + mtmd backend fed the reference's exact prompt, fidelity gates, and every user error.

Needs llama-cpp-python (skipped without it) and the converter in the user cache (CI runs
`python -m pocketvlm.export.gguf fetch-converter` first; the tests never download anything).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pocketvlm[gguf]')")

from conftest import (assert_user_error, draw_image, load_json, reference_image_features, run_cli,  # noqa: E402
                      write_video)

from pocketvlm.errors import PocketVLMError  # noqa: E402
from pocketvlm.manifest import read_manifest, write_manifest  # noqa: E402
from pocketvlm.media import load_video  # noqa: E402
from pocketvlm.prompt import Processor, Request  # noqa: E402
from pocketvlm.evaluate import builtin_samples  # noqa: E402
from pocketvlm.quantize.fidelity import gate, near_tie  # noqa: E402

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module", autouse=True)
def _converter_cached():
    from pocketvlm.errors import PocketVLMError
    from pocketvlm.export.gguf import resolve_converter

    try:
        resolve_converter(fetch=False)
    except PocketVLMError as e:
        pytest.fail(f"{e} (tests never download; CI prefetches it)")


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported as a user does it, once per quant."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        proc = run_cli("export", tiny_model, "--to", "gguf", "--quant", quant, "--out", root / quant)
        assert proc.returncode == 0, proc.stderr
        out[quant] = root / quant
    return out


@pytest.fixture(scope="module")
def gguf(exports):
    from pocketvlm.runtime.gguf import GGUFBackend

    backend = GGUFBackend(exports["f16"])
    yield backend
    backend.close()


def requests_by_kind(tmp_path, processor: Processor) -> dict[str, Request]:
    cfg = processor.config
    video = load_video(write_video(tmp_path / "clip.mp4", seconds=3.0), fps=cfg.video_fps,
                       max_frames=cfg.video_max_frames)
    return {
        "image": Request(QUESTION, images=[draw_image(300, 200)]),
        "two images": Request("Which one is brighter?", images=[draw_image(200, 150, seed=1),
                                                                 draw_image(90, 120, seed=2)]),
        "video": Request("What happens?", video=video),
        "text": Request("Name three colors."),
    }


def remanifest(folder: Path) -> None:
    """Re-hash an artifact after a test tampered with it, so the backend's own checks are what answer."""
    m = read_manifest(folder)
    extra = {k: v for k, v in m.items() if k not in ("schema", "format", "quant", "source", "files", "tools",
                                                      "created")}
    write_manifest(folder, format=m["format"], quant=m["quant"], source=m["source"], tools=m["tools"], **extra)


def no_partial_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(out.name + ".partial-*"))


# ------------------------------------------------------------------------------------------------ export

def test_export_writes_text_model_mmproj_processor_and_manifest(exports):
    from pocketvlm.formats.gguf_reader import read_gguf

    bpw = {}
    for quant, folder in exports.items():
        m = load_json(folder / "pocketvlm.json")
        assert m["format"] == "gguf" and m["quant"] == quant
        # the vision encoder + projector: q8_0 beside a quantized text model, f16 beside f16 (--vision-quant)
        vision = "f16" if quant == "f16" else "q8_0"
        mmproj_file = f"mmproj-{vision}.gguf"
        assert m["gguf"]["model"] == f"model-{quant}.gguf" and m["gguf"]["mmproj"] == mmproj_file
        assert m["gguf"]["mmproj_quant"] == vision
        assert {f["path"] for f in m["files"]} >= {f"model-{quant}.gguf", mmproj_file, "tokenizer.json",
                                                   "config.json", "preprocessor_config.json"}
        assert m["tools"]["llama-cpp-python"] and "sdist" in m["tools"]["converter"]
        assert m["gguf"]["pre_tokenizer_fallback"] == "smollm"  # the tiny tokenizer is trained here
        model, mmproj = read_gguf(folder / m["gguf"]["model"]), read_gguf(folder / mmproj_file)
        assert model.architecture == "llama" and mmproj.architecture == "clip"
        assert model.metadata["tokenizer.ggml.pre"] == "smollm"
        assert mmproj.metadata["clip.projector_type"] == "idefics3"
        assert (vision in mmproj.type_counts()) and ("q8_0" not in mmproj.type_counts()) == (vision == "f16")
        bpw[quant] = m["gguf"]["bits_per_weight"]
        Processor(folder)  # the artifact carries everything the prompt needs
        assert not list(folder.parent.glob("*.partial-*"))
    assert "q8_0" in read_gguf(exports["q8_0"] / "model-q8_0.gguf").type_counts()
    assert bpw["f16"] > bpw["q8_0"] > bpw["q4_k_m"] > 4.5


def gguf_py_types(path: Path) -> dict[str, int]:
    """Tensor types of a GGUF file as gguf-py (llama.cpp's own Python reader) reads them."""
    import collections

    import gguf as gguf_py

    return dict(collections.Counter(t.tensor_type.name.lower() for t in gguf_py.GGUFReader(path).tensors))


def test_q8_0_mmproj_is_q8_0_and_answers(exports, reference, tmp_path):
    """The q8_0 export's mmproj: every 2-D weight whose rows divide into 32-value blocks is q8_0 (gguf-py reads
    it), the rest f16/f32 as llama.cpp's converter leaves them; mtmd loads it and its features stay close to the
    reference's; the f16 export keeps no q8_0 tensor."""
    import gguf as gguf_py

    from pocketvlm.quantize.fidelity import vision_fidelity

    path = exports["q8_0"] / "mmproj-q8_0.gguf"
    types = gguf_py_types(path)
    assert types.get("q8_0", 0) > 10 and set(types) <= {"q8_0", "f16", "f32"}
    for t in gguf_py.GGUFReader(path).tensors:
        if t.tensor_type.name == "Q8_0":
            assert int(t.shape[0]) % 32 == 0  # ne0, the row length, in whole blocks
    assert "q8_0" not in gguf_py_types(exports["f16"] / "mmproj-f16.gguf")
    from pocketvlm.runtime.gguf import GGUFBackend

    backend = GGUFBackend(exports["q8_0"])
    try:
        assert backend.vision_weights == "q8_0" and backend.describe()["vision"]["weights"] == "q8_0"
        cosines = vision_fidelity(reference, backend, Request(QUESTION, images=[draw_image()]))
    finally:
        backend.close()
    assert cosines.min() >= gate("gguf", "q8_0")["vision_cosine_min"]
    proc = run_cli("ask", exports["q8_0"], QUESTION, "--image", _image(tmp_path), "--max-tokens", 4, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"]


def test_vision_quant_f16_and_its_mmproj_quant_alias(tiny_model, tmp_path):
    for flag in ("--vision-quant", "--mmproj-quant"):
        out = tmp_path / flag.strip("-")
        proc = run_cli("export", tiny_model, "--to", "gguf", "--quant", "q8_0", flag, "f16", "--out", out, "--quiet")
        assert proc.returncode == 0, proc.stderr
        m = load_json(out / "pocketvlm.json")
        assert m["quant"] == "q8_0" and m["gguf"]["mmproj"] == "mmproj-f16.gguf" and m["gguf"]["mmproj_quant"] == "f16"
        assert "q8_0" not in gguf_py_types(out / "mmproj-f16.gguf")
        assert not (out / "mmproj-q8_0.gguf").exists()
    proc = run_cli("export", tiny_model, "--to", "gguf", "--mmproj-quant", "q8_0", "--out", tmp_path / "f16q8",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert load_json(tmp_path / "f16q8" / "pocketvlm.json")["gguf"]["mmproj"] == "mmproj-q8_0.gguf"


@pytest.mark.parametrize("flag", ["--vision-quant", "--mmproj-quant"])
def test_unknown_vision_quant_is_one_line_and_writes_nothing(tiny_model, tmp_path, flag):
    out = tmp_path / "out"
    proc = run_cli("export", tiny_model, "--to", "gguf", "--quant", "q8_0", flag, "q4_0", "--out", out)
    assert_user_error(proc, "invalid choice: 'q4_0'", "f16", "q8_0")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # and through the API, which the CLI's choices do not guard
    from pocketvlm.export import gguf as export_gguf
    from pocketvlm.models import resolve_source

    with pytest.raises(PocketVLMError, match="unknown --vision-quant 'q4_0'"):
        export_gguf.export(resolve_source(str(tiny_model)), out, "q8_0", force=False, progress=False,
                           vision_quant="q4_0")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_q4_k_m_reports_fallbacks_and_bits_per_weight(exports):
    q = load_json(exports["q4_k_m"] / "pocketvlm.json")["quantization"]
    # The tiny model's rows (128, 192 values) do not divide into 256-value q4_K blocks: llama.cpp falls back.
    assert q["n_fallback"] == len(q["fallbacks"]) > q["matrices"] // 2
    assert {f["got"] for f in q["fallbacks"]} <= {"q5_0", "q8_0"}
    assert all(f["columns"] % 256 for f in q["fallbacks"])
    assert "mostly not q4_K" in q["warning"] and 5 < q["bits_per_weight"] < 8
    q8 = load_json(exports["q8_0"] / "pocketvlm.json")["quantization"]
    assert q8["n_fallback"] == 0 and q8["on_target"] == q8["matrices"] and "warning" not in q8


def test_decode_weight_bytes_leave_out_the_embedding_table(exports):
    """The bench's memory roofline: a decode step reads every text weight but only one row of the embedding."""
    from pocketvlm.formats.gguf import artifact_files
    from pocketvlm.formats.gguf_reader import decode_weight_bytes, read_gguf

    for quant in ("f16", "q4_k_m"):
        model_file, _ = artifact_files(exports[quant], load_json(exports[quant] / "pocketvlm.json"))
        info = read_gguf(model_file)
        embedding = info.tensor("token_embd.weight")
        assert info.tensor("output.weight") is not None and embedding.nbytes > 0
        assert decode_weight_bytes(info) == info.tensor_bytes - embedding.nbytes


# ------------------------------------------------------------------------------------------------ prompt

@pytest.mark.parametrize("kind", ["image", "two images", "video", "text"])
def test_llama_cpp_is_fed_the_reference_prompt_token_by_token(gguf, reference, tmp_path, kind):
    request = requests_by_kind(tmp_path, reference.processor)[kind]
    ref_ids = reference.processor.encode(request).input_ids.tolist()
    steps = list(gguf.generate(request, 2, ignore_eos=True))
    assert len(steps) == 2
    fed = gguf.last_prefill
    assert fed.token_ids == ref_ids  # same tokens, same <image> runs, same separators, same order
    assert fed.n_past == len(ref_ids)  # and llama.cpp's KV cache holds exactly that many positions
    enc = reference.processor.encode(request)
    assert fed.tiles == (enc.pixel_values.shape[1] if enc.pixel_values is not None else 0)
    assert gguf.prompt_token_ids(request) == ref_ids


def test_each_image_run_gets_the_embeddings_of_its_own_tile(gguf, reference):
    enc = reference.processor.encode(Request(QUESTION, images=[draw_image(300, 200)]))
    assert enc.pixel_values.shape[1] == 5  # 2x2 tiles + the global image on the tiny model
    ours = np.stack([gguf._encode_tile(gguf._tile_pixels(t, m))
                     for t, m in zip(enc.pixel_values[0], enc.pixel_attention_mask[0])])
    ref = reference_image_features(reference.model, enc.pixel_values, enc.pixel_attention_mask).reshape(ours.shape)
    scale = np.abs(ref).max()
    for i in range(len(ours)):
        distances = [np.abs(ours[i] - ref[j]).max() for j in range(len(ref))]
        assert distances[i] < 0.01 * scale, (i, distances)
        assert min(d for j, d in enumerate(distances) if j != i) > 0.2 * scale  # tiles are told apart


# ----------------------------------------------------------------------------------------------- fidelity

def test_f16_reproduces_the_reference_greedy_tokens_except_at_near_ties(gguf, reference):
    """Free-running greedy decoding follows the reference for 32 tokens; where it leaves it, the reference itself
    was at a near-tie. Teacher-forced, every step's logits are within fp16 rounding of the reference's (the one
    near-tie rule `check` applies, quantize/fidelity.py) and it picks the reference's token unless the reference's
    top two are within what that rounding can swap."""
    exact = 0
    for sample in builtin_samples():
        ref = reference.run(sample.request, 32, ignore_eos=True, with_logits=True)
        free = gguf.run(sample.request, 32, ignore_eos=True)
        assert len(free.token_ids) == 32
        forced = list(gguf.generate(sample.request, 32, with_logits=True, force=ref.token_ids))
        assert len(forced) == 32
        if free.token_ids == ref.token_ids:
            exact += 1
        else:
            k = next(i for i, (a, b) in enumerate(zip(free.token_ids, ref.token_ids)) if a != b)
            assert near_tie(ref.logits[k], forced[k].logits, "fp16")[2], (sample.name, k)
        for i, (r, step) in enumerate(zip(ref.logits, forced)):
            gap, swappable, tie = near_tie(r, step.logits, "fp16")
            assert np.abs(step.logits[: len(r)] - r).max() <= swappable / 2, (sample.name, i)  # within the budget
            if step.token_id != int(np.argmax(r)):
                assert tie, (sample.name, i, gap, swappable)
    assert exact >= 1


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_check_reports_and_passes_the_gates(exports, tmp_path, quant):
    report_file = tmp_path / "report.json"
    proc = run_cli("check", exports[quant], "--report", report_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    vision = "f16" if quant == "f16" else "q8_0"
    assert f"vision encoder {vision}" in proc.stdout
    report = load_json(report_file)
    assert report["format"] == "gguf" and report["quant"] == quant and report["pass"]
    assert report["vision_weights"] == vision and report["summary"]["vision_tiles"] > 0
    assert report["summary"]["vision_cosine_min"] >= report["thresholds"]["vision_cosine_min"]
    assert report["thresholds"] == gate("gguf", quant) and report["thresholds"]
    s = report["summary"]
    assert {"greedy_match", "kld_mean", "kld_max", "top1"} <= set(s)
    assert s["kld_mean"] <= report["thresholds"]["kld_mean_max"] and s["top1"] >= report["thresholds"]["top1_min"]
    if quant == "f16":
        assert s["kld_mean"] < 1e-3 and s["top1"] > 0.95


def test_gates_tell_a_wrong_model_apart(exports, tiny_model, tmp_path):
    """The q4_k_m gate is not vacuous: the same model with its weights shuffled, exported the same way, fails it.
    On a random model at the ordinary initialisation the logits are near-flat, so even an unrelated model's KLD is
    small (~0.05 nats, against ~7 on the trained micro model); top-1 agreement is what tells them apart here."""
    from pocketvlm.bench_device.gate_calibration import shuffled_copy

    shuffled = shuffled_copy(tiny_model, tmp_path / "shuffled")
    out = tmp_path / "other"
    assert run_cli("export", shuffled, "--to", "gguf", "--quant", "q4_k_m", "--out", out, "--quiet").returncode == 0
    proc = run_cli("check", out, "--reference", tiny_model, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["pass"] and report["summary"]["top1"] < gate("gguf", "q4_k_m")["top1_min"]
    assert any(f.startswith("top-1 agreement") for f in report["failures"]), report["failures"]


# ---------------------------------------------------------------------------------------------- ask / quantize

def _image(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    draw_image(300, 200).save(path)
    return path


def test_ask_answers_from_the_artifact(exports, tmp_path):
    image = _image(tmp_path)
    proc = run_cli("ask", exports["q4_k_m"], QUESTION, "--image", image, "--max-tokens", 8, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == "gguf" and result["quant"] == "q4_k_m"
    assert 1 <= len(result["token_ids"]) <= 8 and result["timings"]["encode_s"] > 0
    plain = run_cli("ask", exports["f16"], QUESTION, "--image", image, "--max-tokens", 8)
    assert plain.returncode == 0 and "gguf f16" in plain.stderr and "prefill" in plain.stderr, plain.stderr
    video = write_video(tmp_path / "clip.mp4")
    proc = run_cli("ask", exports["f16"], "What happens?", "--video", video, "--max-tokens", 4, "--ignore-eos",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 4


def test_backend_imports_neither_torch_nor_transformers(exports, tmp_path):
    code = ("import sys; from pocketvlm.runtime import open_backend; from pocketvlm.prompt import Request; "
            "from PIL import Image; b = open_backend(sys.argv[1]); "
            "b.run(Request('What is it?', images=[Image.new('RGB', (80, 60), 'red')]), 2); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code, str(exports["f16"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_quantize_an_f16_artifact_reports_fallbacks(exports, tmp_path):
    out = tmp_path / "q4"
    proc = run_cli("quantize", exports["f16"], "--quant", "q4_k_m", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "fell back" in proc.stderr and "bits/weight" in proc.stderr
    assert "pocketvlm: warning: q4_k_m is mostly not q4_K" in proc.stderr
    m = load_json(out / "pocketvlm.json")
    assert m["quant"] == "q4_k_m" and m["source"] == load_json(exports["f16"] / "pocketvlm.json")["source"]
    assert m["quantization"]["n_fallback"] > 0 and m["quantization"]["bits_per_weight"] < 8
    # the same llama.cpp quantizer as `export --quant q4_k_m`: the same tensors
    exported = load_json(exports["q4_k_m"] / "pocketvlm.json")["quantization"]
    assert m["quantization"]["types"] == exported["types"]
    # the f16 mmproj becomes q8_0, as `export --quant q4_k_m` makes it (gguf-py's q8_0 from the f16 values, the
    # converter's from the checkpoint's: the same types, tensor by tensor)
    assert m["gguf"]["mmproj"] == "mmproj-q8_0.gguf" and m["gguf"]["mmproj_quant"] == "q8_0"
    assert not (out / "mmproj-f16.gguf").exists()
    assert gguf_py_types(out / "mmproj-q8_0.gguf") == gguf_py_types(exports["q4_k_m"] / "mmproj-q8_0.gguf")
    proc = run_cli("ask", out, QUESTION, "--max-tokens", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("ask", out, QUESTION, "--image", _image(tmp_path), "--max-tokens", 3, "--json")
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------------------------------- errors

def _copy(artifact: Path, dest: Path) -> Path:
    shutil.copytree(artifact, dest)
    return dest


def test_truncated_or_foreign_model_file_is_one_line(exports, tmp_path):
    art = _copy(exports["f16"], tmp_path / "cut")
    model = art / "model-f16.gguf"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("ask", art, QUESTION), "model-f16.gguf", "the manifest says")
    remanifest(art)  # now the manifest agrees: the GGUF reader must notice
    assert_user_error(run_cli("ask", art, QUESTION), "truncated GGUF file")
    model.write_bytes(data[:100])  # cut inside the header
    remanifest(art)
    assert_user_error(run_cli("ask", art, QUESTION), "truncated GGUF file")
    model.write_bytes(b"PK\x03\x04 definitely a zip file, not a model" * 100)
    remanifest(art)
    assert_user_error(run_cli("ask", art, QUESTION), "not a GGUF file")
    shutil.copy2(art / "mmproj-f16.gguf", model)  # a GGUF, but the wrong kind
    remanifest(art)
    assert_user_error(run_cli("ask", art, QUESTION), "not a text model GGUF")


def test_missing_mmproj_is_one_line(exports, tmp_path):
    art = _copy(exports["f16"], tmp_path / "nomm")
    (art / "mmproj-f16.gguf").unlink()
    assert_user_error(run_cli("ask", art, QUESTION), "mmproj-f16.gguf is missing")
    remanifest(art)
    assert_user_error(run_cli("ask", art, QUESTION), "mmproj", "is missing")


def other_width_model(tiny_model: Path, dest: Path) -> Path:
    """A SmolVLM2-architecture model whose text model is 64 wide (the tiny one is 128)."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = SmolVLMConfig.from_pretrained(tiny_model)
    config.text_config.hidden_size = 64
    config.text_config.head_dim = 16
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config)
    model.save_pretrained(dest)
    for f in tiny_model.iterdir():
        if f.is_file() and not (dest / f.name).exists() and f.name != "pocketvlm.json":
            shutil.copy2(f, dest / f.name)
    cfg = load_json(dest / "config.json")
    cfg["text_config"]["architectures"] = ["VLlama3ForCausalLM"]
    cfg["text_config"]["rope_theta"] = load_json(tiny_model / "config.json")["text_config"]["rope_theta"]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def test_mmproj_from_another_model_is_one_line(exports, tiny_model, tmp_path):
    other = other_width_model(tiny_model, tmp_path / "narrow")
    out = tmp_path / "narrow-gguf"
    proc = run_cli("export", other, "--to", "gguf", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    art = _copy(exports["f16"], tmp_path / "mixed")
    shutil.copy2(out / "mmproj-f16.gguf", art / "mmproj-f16.gguf")
    assert_user_error(run_cli("ask", art, QUESTION), "mmproj-f16.gguf", "the artifact is corrupt or was changed")
    remanifest(art)
    line = assert_user_error(run_cli("ask", art, QUESTION), "projects images to 64-dim embeddings",
                             "takes 128", "from another model")
    assert "model-f16.gguf" in line
    # quantize refuses the mismatched pair too, before writing anything
    q = tmp_path / "mixed-q8"
    assert_user_error(run_cli("quantize", art, "--quant", "q8_0", "--out", q), "from another model")
    assert no_partial_left(q)


def test_unknown_quant_and_non_empty_output_are_one_line(exports, tiny_model, tmp_path):
    out = tmp_path / "x"
    assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--quant", "q3_k", "--out", out),
                      "unknown --quant 'q3_k' for gguf", "f16, q8_0, q4_k_m")
    assert_user_error(run_cli("quantize", exports["f16"], "--quant", "q2_k", "--out", out),
                      "unknown --quant 'q2_k' for gguf", "q8_0, q4_k_m")
    assert_user_error(run_cli("quantize", exports["q8_0"], "--quant", "q4_k_m", "--out", out),
                      "is q8_0; quantize from an f16 gguf export")
    assert no_partial_left(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--out", out), "already exists and is not empty")
    assert_user_error(run_cli("quantize", exports["f16"], "--quant", "q8_0", "--out", out),
                      "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob("x.partial-*"))


def test_converter_not_obtainable_is_one_line_with_the_fix(tiny_model, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--llama-cpp-dir", empty, "--out", out),
                             "has no convert_hf_to_gguf.py", "llama.cpp checkout")
    assert str(empty) in line
    assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--out", out,
                              env={"POCKETVLM_LLAMA_CPP_DIR": str(tmp_path / "nowhere")}),
                      "POCKETVLM_LLAMA_CPP_DIR", "no such folder")
    # No cached converter and no package index reachable: pip fails (offline, without touching the network).
    links = tmp_path / "links"
    links.mkdir()
    offline = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links),
               "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}
    assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--out", out, "--quiet", env=offline),
                      "could not download the llama-cpp-python", "fetch-converter", "--llama-cpp-dir")
    proc = _python_module("pocketvlm.export.gguf", "fetch-converter", "--quiet", env=offline)
    assert_user_error(proc, "could not download")
    assert no_partial_left(out) and not list((tmp_path / "cache").rglob("convert_hf_to_gguf.py"))


def _python_module(module, *args, env=None):
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_a_failing_converter_leaves_no_partial_artifact(tiny_model, tmp_path):
    fake = tmp_path / "llama.cpp"
    (fake / "gguf-py" / "gguf").mkdir(parents=True)
    (fake / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\n\ndef main():\n    print('ERROR: this converter cannot read the model', file=sys.stderr)\n"
        "    sys.exit(1)\n")
    out = tmp_path / "out"
    assert_user_error(run_cli("export", tiny_model, "--to", "gguf", "--llama-cpp-dir", fake, "--out", out, "--quiet"),
                      "llama.cpp's converter failed on the text model", "cannot read the model")
    assert no_partial_left(out)


def test_fetch_converter_prints_the_cached_folder():
    proc = _python_module("pocketvlm.export.gguf", "fetch-converter", "--quiet")
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir()



def _sdist_with_converter(tmp_path, parts):
    """A tarball laid out as llama-cpp-python's sdist, holding only `parts` of vendor/llama.cpp."""
    tree = tmp_path / "sdist-tree" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    for name in parts:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"# {name}\n")
    (tree / "README.md").write_text("not kept\n")
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "sdist-tree" / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    return sdist


def test_a_stale_converter_cache_is_replaced_whole(tmp_path):
    """A cache written by an older pocketvlm (no convert_lora_to_gguf.py) is replaced, not renamed onto (which
    failed with 'Directory not empty' and a traceback): the new folder has every script, nothing else is left."""
    from pocketvlm.export.gguf import _is_converter_dir, install_converter

    cache = tmp_path / "cache" / "llama.cpp-9.9.9"
    (cache / "gguf-py" / "gguf").mkdir(parents=True)
    (cache / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (cache / "convert_hf_to_gguf.py").write_text("# old\n")
    assert not _is_converter_dir(cache)
    sdist = _sdist_with_converter(tmp_path, ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE",
                                             "gguf-py/gguf/__init__.py", "conversion/__init__.py"])
    install_converter(sdist, cache, "9.9.9")
    assert _is_converter_dir(cache)
    assert (cache / "convert_hf_to_gguf.py").read_text() == "# convert_hf_to_gguf.py\n"
    assert not (cache / "README.md").exists()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["llama.cpp-9.9.9"]  # no partial or stale folder


def test_an_sdist_without_the_lora_converter_is_refused_and_leaves_no_cache(tmp_path):
    from pocketvlm.export.gguf import install_converter

    cache = tmp_path / "cache" / "llama.cpp-9.9.9"
    sdist = _sdist_with_converter(tmp_path, ["convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"])
    with pytest.raises(PocketVLMError, match="missing from the source distribution"):
        install_converter(sdist, cache, "9.9.9")
    assert list(cache.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------- real shape

@pytest.mark.slow
def test_real_500m_shape_exports_and_runs_the_reference_layout(tmp_path):
    """At SmolVLM2-500M's real shape the backend feeds transformers' 4x4 + global tiling (17 tiles of 512 px,
    1,147 prompt tokens) exactly, generates, and its first step matches the reference's distribution."""
    from pocketvlm.runtime.gguf import GGUFBackend

    times = {}
    start = time.perf_counter()
    assert run_cli("make-model", tmp_path / "m500", "--preset", "500m", "--quiet", timeout=1200).returncode == 0
    times["make_model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    proc = run_cli("export", tmp_path / "m500", "--to", "gguf", "--out", tmp_path / "g500", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    times["export_f16_s"] = time.perf_counter() - start
    start = time.perf_counter()
    backend = GGUFBackend(tmp_path / "g500")
    times["open_s"] = time.perf_counter() - start
    request = Request("What is in the image?", images=[draw_image(512, 512)])
    ref_enc = Processor(tmp_path / "m500").encode(request)  # the reference's prompt, from the source folder
    result = backend.run(request, 4, ignore_eos=True)
    fed = backend.last_prefill
    assert fed.tiles == ref_enc.pixel_values.shape[1] == 17
    assert fed.token_ids == ref_enc.input_ids.tolist() and fed.n_past == len(fed.token_ids)
    assert len(result.token_ids) == 4 and result.prompt_tokens == len(fed.token_ids)
    times.update({k: v for k, v in vars(result.timings).items() if v is not None})
    print("\n500m gguf f16:", {k: round(v, 2) for k, v in times.items()}, f"prompt {result.prompt_tokens} tokens")
    forced = list(backend.generate(request, 1, with_logits=True, force=[0]))
    backend.close()
    # Numerically the same model on the same prompt: the first step's distribution matches the reference's.
    from pocketvlm.runtime.reference import ReferenceBackend

    ref = ReferenceBackend(tmp_path / "m500").run(request, 1, ignore_eos=True, with_logits=True)
    r, g = ref.logits[0].astype(np.float64), forced[0].logits[: len(ref.logits[0])].astype(np.float64)
    p, q = r - r.max() - np.log(np.exp(r - r.max()).sum()), g - g.max() - np.log(np.exp(g - g.max()).sum())
    kld = float((np.exp(p) * (p - q)).sum())
    print(f"500m first step vs reference: KLD {kld:.2e}, max |dlogit| {np.abs(r - g).max():.3f}")
    assert kld < 1e-3 and ref.token_ids[0] == result.token_ids[0]
