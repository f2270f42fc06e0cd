"""Core ML path. On Linux (no Core ML runtime): the converted wrapper modules reproduce the PyTorch reference in
torch; every quant exports; the saved specs, op counts, sizes and decompressed weights are checked; `ask` refuses
plainly. On macOS (marked `macos`, unrun on Linux CI): the packages run and are compared with the reference exactly
like the other formats."""

from __future__ import annotations

import json
import platform
import re

import numpy as np
import pytest
from conftest import assert_user_error, draw_image, load_json, reference_image_features, run_cli

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'pocketvlm[coreml]')")

from pocketvlm.prompt import Processor, Request  # noqa: E402

QUANTS = ("fp16", "int8", "int4")
VISION, DECODER = "VisionEncoder.mlpackage", "TextDecoder.mlpackage"
macos = pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction needs macOS")
# relative Frobenius error of a decompressed weight against the fp32 original: fp16 rounding / 8-bit / 4-bit
DRIFT = {"fp16": (0, 1e-3), "int8": (1e-3, 0.02), "int4": (0.02, 0.2)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coreml_exports(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    out = {}
    for quant in QUANTS:
        proc = run_cli("export", tiny_model, "--to", "coreml", "--quant", quant, "--max-context", 256,
                       "--out", root / quant, "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert ("not the Neural Engine" in proc.stderr) == (quant == "int4"), proc.stderr  # the note, even quiet
        out[quant] = root / quant
    return out


@pytest.fixture(scope="module")
def wrapped(tiny_model):
    from pocketvlm.export.coreml import load_hf, wrappers

    hf = load_hf(tiny_model)
    VisionEncoder, TextDecoder = wrappers()
    return hf, VisionEncoder(hf).eval(), TextDecoder(hf, 512).eval()


# ------------------------------------------------------------------------- the wrappers reproduce the reference

def test_vision_wrapper_reproduces_transformers_features_for_a_multi_tile_image(wrapped, tiny_model):
    import torch

    hf, vision, _ = wrapped
    enc = Processor(tiny_model).encode(Request("What is it?", images=[draw_image(200, 150)]))
    assert enc.pixel_values.shape[1] == 5  # a 2x2 grid + the global view
    with torch.no_grad():
        ours = vision(torch.from_numpy(enc.pixel_values[0])).numpy()
    theirs = reference_image_features(hf.model, enc.pixel_values, enc.pixel_attention_mask).reshape(ours.shape)
    assert float(np.abs(ours - theirs).max()) <= 1e-5


def wrapper_generate(wrapped, processor, request, max_tokens):
    """Greedy decoding as runtime/coreml.py does it, on the torch modules that are converted."""
    import torch

    from pocketvlm.formats.coreml import causal_mask

    hf, vision, decoder = wrapped
    enc = processor.encode(request)
    ids = torch.from_numpy(enc.input_ids)[None]
    table = hf.model.text_model.embed_tokens
    decoder.reset()
    tokens = []
    with torch.no_grad():
        embeds = table(ids)
        if enc.pixel_values is not None:
            feats = vision(torch.from_numpy(enc.pixel_values[0]))
            embeds[ids == processor.image_token_id] = feats.reshape(-1, feats.shape[-1])
        n = ids.shape[1]
        logits = decoder(embeds, torch.arange(n)[None], torch.from_numpy(causal_mask(n, n)))
        position = n
        for _ in range(max_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            logits = decoder(table(torch.tensor([[token]])), torch.tensor([[position]]),
                             torch.from_numpy(causal_mask(1, position + 1)))
            position += 1
    return tokens


@pytest.mark.parametrize("images", [1, 0], ids=["image", "text"])
def test_decoder_wrapper_with_static_cache_reproduces_the_reference_greedy_tokens(wrapped, reference, tiny_model,
                                                                                   images):
    request = Request("Describe the picture in detail.", images=[draw_image(seed=2)] * images or None)
    ours = wrapper_generate(wrapped, Processor(tiny_model), request, 32)
    assert ours == reference.run(request, 32, ignore_eos=True).token_ids


# ----------------------------------------------------------------------------------------- export + spec

def test_every_quant_exports_with_the_expected_spec(coreml_exports):
    for quant, path in coreml_exports.items():
        manifest = load_json(path / "pocketvlm.json")
        assert manifest["format"] == "coreml" and manifest["quant"] == quant
        assert manifest["deployment_target"] == "iOS18" and manifest["coreml"]["max_context"] == 256
        files = {f["path"] for f in manifest["files"]}
        assert {"embed_tokens.npy", "tokenizer.json", "config.json", "preprocessor_config.json"} <= files
        assert any(f.startswith(VISION + "/") for f in files) and any(f.startswith(DECODER + "/") for f in files)
        table = np.load(path / "embed_tokens.npy")
        assert table.dtype == np.float16 and table.shape == (384, 128)

        from pocketvlm.quantize.coreml import describe

        vision, decoder = describe(path / VISION), describe(path / DECODER)
        assert manifest["coreml"]["packages"][VISION] == json.loads(json.dumps(vision))
        assert vision["spec_version"] == decoder["spec_version"] == 9  # iOS 18 / macOS 15
        pv = vision["inputs"]["pixel_values"]
        assert pv["dtype"] == "FLOAT32" and pv["ranges"] == [[1, 8], [3, 3], [64, 64], [64, 64]]
        assert list(vision["outputs"]) == ["image_features"] and not vision["states"]
        assert list(decoder["inputs"]) == ["inputs_embeds", "position_ids", "causal_mask"]
        assert decoder["inputs"]["inputs_embeds"]["ranges"] == [[1, 1], [1, 256], [128, 128]]
        assert decoder["inputs"]["position_ids"]["dtype"] == "INT32"
        assert decoder["inputs"]["causal_mask"]["ranges"] == [[1, 1], [1, 1], [1, 256], [1, 256]]
        assert decoder["outputs"] == {"logits": {"dtype": "FLOAT32", "shape": [1, 1, 384]}}
        assert decoder["states"] == {name: {"dtype": "FLOAT16", "shape": [2, 1, 2, 256, 32]}
                                     for name in ("k_cache", "v_cache")}
        ops = decoder["ops"]
        assert ops["read_state"] >= 4 and ops["write_state"] == 4  # k and v, per layer
        assert ops["scaled_dot_product_attention"] == 2 and ops["linear"] == 15  # 7 per layer + lm_head
        assert vision["ops"]["conv"] == 1 and vision["ops"]["softmax"] == 2
        assert not {"bucketize", "while_loop", "cond"} & (set(ops) | set(vision["ops"]))


def test_weights_are_compressed_per_quant_and_sizes_shrink(coreml_exports):
    info = {q: load_json(p / "pocketvlm.json") for q, p in coreml_exports.items()}
    sizes = {q: {n: m["coreml"]["packages"][n]["weight_bytes"] for n in (VISION, DECODER)} for q, m in info.items()}
    for name in (VISION, DECODER):
        assert sizes["int4"][name] < sizes["int8"][name] < sizes["fp16"][name], (name, sizes)
    assert sizes["int8"][DECODER] < 0.6 * sizes["fp16"][DECODER]
    assert sizes["int4"][DECODER] < 0.4 * sizes["fp16"][DECODER]
    for quant, op_name, count in (("fp16", "constexpr_blockwise_shift_scale", 0),
                                  ("int8", "constexpr_blockwise_shift_scale", 15),
                                  ("int4", "constexpr_blockwise_shift_scale", 15)):
        assert info[quant]["coreml"]["packages"][DECODER]["ops"].get(op_name, 0) == count, quant
    assert info["int4"]["quantization"] == {"method": "linear_symmetric", "dtype": "int4", "weight_threshold": 2048,
                                            "granularity": "per_block", "block_size": 32,
                                            "conv": "int8 per_channel",
                                            "vision": "int4 per block of 32 (patch convolution int8 per channel)"}
    assert info["int8"]["quantization"]["granularity"] == "per_channel"
    assert info["int8"]["quantization"]["vision"] == "int8 per channel"
    assert info["fp16"]["quantization"]["vision"] == "fp16"
    # the compute units each quant loads with (int4 off the Neural Engine: apple/coreai-models#279,
    # apple/coremltools#2716), recorded where a consumer of the artifact reads it
    assert {q: m["coreml"]["compute_units"] for q, m in info.items()} == {"fp16": "ALL", "int8": "ALL",
                                                                           "int4": "CPU_AND_GPU"}


def decompressed_weights(package) -> dict[str, np.ndarray]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    model = ct.models.MLModel(str(package), skip_model_load=True)
    if any(k.startswith("constexpr_") for k in load_ops(package)):
        model = cto.decompress_weights(model)
    meta = cto.get_weights_metadata(model, weight_threshold=1024)
    return {re.sub(r"(_to_fp16)?(_quantized|_palettized)?$", "", k): np.asarray(v.val, np.float32)
            for k, v in meta.items()}


def load_ops(package):
    from pocketvlm.quantize.coreml import describe

    return describe(package)["ops"]


@pytest.mark.parametrize("quant", QUANTS)
def test_decompressed_weights_drift_from_the_originals_within_bounds(coreml_exports, wrapped, quant):
    hf, vision, decoder = wrapped
    drift = {}
    for name, module in ((VISION, vision), (DECODER, decoder)):
        originals = {n.replace(".", "_"): p.detach().numpy() for n, p in module.named_parameters()}
        weights = decompressed_weights(coreml_exports[quant] / name)
        matched = {k: v for k, v in weights.items() if k in originals}
        assert len(matched) >= (15 if name == DECODER else 14), sorted(weights)
        for key, w in matched.items():
            ref = originals[key]
            assert w.shape == ref.shape, key
            drift[f"{name}:{key}"] = float(np.linalg.norm(w - ref) / np.linalg.norm(ref))
    # every weight is compressed; under int4 the patch convolution (3 input channels, no block of 32) is int8
    for key, value in drift.items():
        low, high = DRIFT["int8" if quant == "int4" and "patch_embedding" in key else quant]
        assert low <= value <= high, (key, value)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_decompressed_vision_weights_keep_the_features_within_the_vision_gate(coreml_exports, wrapped, tiny_model,
                                                                              quant):
    """What `check` would measure on a Mac, simulated in torch (fp32 compute): the vision wrapper with the Core ML
    package's decompressed weights against the original, per tile, gated by fidelity.json's vision_cosine_min."""
    import copy

    import torch

    from pocketvlm.quantize.fidelity import gate, tile_cosines

    _, vision, _ = wrapped
    weights = decompressed_weights(coreml_exports[quant] / VISION)
    simulated = copy.deepcopy(vision)
    replaced = 0
    with torch.no_grad():
        for name, param in simulated.named_parameters():
            key = name.replace(".", "_")
            if key in weights:
                param.copy_(torch.from_numpy(weights[key]).reshape(param.shape))
                replaced += 1
    assert replaced >= 14
    enc = Processor(tiny_model).encode(Request("What is it?", images=[draw_image(200, 150)]))
    with torch.no_grad():
        pixels = torch.from_numpy(enc.pixel_values[0])
        cosines = tile_cosines(vision(pixels).numpy(), simulated(pixels).numpy())
    assert len(cosines) == 5
    assert 1 - 1e-7 > cosines.min() >= gate("coreml", quant)["vision_cosine_min"], cosines


# ------------------------------------------------------------------------------------------- user-facing

@pytest.mark.skipif(platform.system() == "Darwin", reason="the refusal is for systems without Core ML")
def test_ask_on_a_coreml_artifact_says_it_needs_macos(coreml_exports, image_file):
    proc = run_cli("ask", coreml_exports["fp16"], "What is it?", "--image", image_file)
    line = assert_user_error(proc, "Core ML runs only on macOS (this is Linux)")
    assert str(coreml_exports["fp16"]) in line


def test_quantize_an_fp16_artifact(coreml_exports, tmp_path):
    out = tmp_path / "q8"
    proc = run_cli("quantize", coreml_exports["fp16"], "--quant", "int8", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = load_json(out / "pocketvlm.json")
    assert manifest["quant"] == "int8" and manifest["derived_from"]["quant"] == "fp16"
    expected = load_json(coreml_exports["int8"] / "pocketvlm.json")["coreml"]["packages"]
    for name in (VISION, DECODER):
        assert manifest["coreml"]["packages"][name]["weight_bytes"] == expected[name]["weight_bytes"]
    assert "Neural Engine" not in proc.stderr  # int8 is per channel: no trap to warn about
    assert_user_error(run_cli("quantize", out, "--quant", "int4", "--out", tmp_path / "again"),
                      "is int8; quantize from an fp16 coreml export")
    # int4, even with --quiet: one note line naming both upstream reports, and the artifact records CPU_AND_GPU
    proc = run_cli("quantize", coreml_exports["fp16"], "--quant", "int4", "--out", tmp_path / "q4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("pocketvlm: note: ")]
    assert len(notes) == 1 and "not the Neural Engine" in notes[0], proc.stderr
    assert "coreai-models#279" in notes[0] and "coremltools#2716" in notes[0]
    assert load_json(tmp_path / "q4" / "pocketvlm.json")["coreml"]["compute_units"] == "CPU_AND_GPU"
    assert_user_error(run_cli("quantize", coreml_exports["fp16"], "--quant", "int2", "--out", tmp_path / "x"),
                      "unknown --quant 'int2' for coreml")


def test_export_errors_are_one_line_and_leave_nothing(tiny_model, tmp_path):
    def export(*extra, out=tmp_path / "out"):
        return run_cli("export", tiny_model, "--to", "coreml", "--out", out, *extra)

    assert_user_error(export("--quant", "q4"), "unknown --quant 'q4' for coreml", "fp16, int8, int4")
    assert_user_error(export("--max-context", 4096), "--max-context 4096", "max_position_embeddings = 2048")
    assert_user_error(export("--group-size", 32), "--group-size does not apply to coreml")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert_user_error(export(out=tmp_path / "full"), "already exists and is not empty")
    assert (tmp_path / "full" / "f").read_text() == "x"
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert not leftovers and not (tmp_path / "out").exists()


def test_unsupported_deployment_target_is_refused(tiny_model, tmp_path):
    from pocketvlm.errors import PocketVLMError
    from pocketvlm.export import export_model

    with pytest.raises(PocketVLMError, match=r"unsupported Core ML deployment target 'iOS17'.*iOS18") as e:
        export_model(str(tiny_model), "coreml", tmp_path / "o", deployment_target="iOS17")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- 256M shape (real dimensions)

@pytest.mark.slow
def test_256m_shape_exports_to_every_quant(tmp_path_factory):
    from pocketvlm.make_model import make_model

    root = tmp_path_factory.mktemp("coreml256")
    src = make_model(root / "src", "256m", seed=0, progress=False)
    sizes = {}
    for quant in QUANTS:
        proc = run_cli("export", src, "--to", "coreml", "--quant", quant, "--max-context", 2048,
                       "--out", root / quant, "--quiet", timeout=3600)
        assert proc.returncode == 0, proc.stderr
        manifest = load_json(root / quant / "pocketvlm.json")
        packages = manifest["coreml"]["packages"]
        vision, decoder = packages[VISION], packages[DECODER]
        assert vision["inputs"]["pixel_values"]["ranges"] == [[1, 64], [3, 3], [512, 512], [512, 512]]
        assert decoder["states"]["k_cache"] == {"dtype": "FLOAT16", "shape": [30, 1, 3, 2048, 64]}
        assert decoder["ops"]["scaled_dot_product_attention"] == 30 and decoder["ops"]["write_state"] == 60
        assert vision["spec_version"] == decoder["spec_version"] == 9
        sizes[quant] = vision["weight_bytes"] + decoder["weight_bytes"]
    # ~0.2 B weights in packages (embedding table on the host): fp16 ~2 bytes each, int8 ~1, int4 ~0.5 + scales
    assert 0.45 < sizes["int8"] / sizes["fp16"] < 0.6 and 0.25 < sizes["int4"] / sizes["fp16"] < 0.35, sizes


# ---------------------------------------------------------------------------------- macOS: real prediction

def check(artifact, tiny_model, tmp_path):
    report = tmp_path / f"{artifact.name}.json"
    proc = run_cli("check", artifact, "--reference", tiny_model, "--report", report)
    return proc, json.loads(report.read_text())


@macos
def test_macos_backend_tokens_timings_and_prompt(coreml_exports, reference):
    from pocketvlm.runtime import open_backend

    backend = open_backend(coreml_exports["fp16"])
    request = Request("Where is the circle?", images=[draw_image(seed=3)])
    assert backend.prompt_token_ids(request) == reference.prompt_token_ids(request)
    result = backend.run(request, 8, ignore_eos=True)
    assert len(result.token_ids) == 8 and result.prompt_tokens == len(reference.prompt_token_ids(request))
    t = result.timings
    assert t.load_s > 0 and t.encode_s > 0 and t.ttft_s > 0 and t.decode_tok_s > 0 and t.prefill_tok_s > 0
    forced = list(backend.generate(request, 4, force=result.token_ids[:4], with_logits=True))
    assert [s.token_id for s in forced] == result.token_ids[:4] and forced[0].logits.shape == (384,)


@macos
@pytest.mark.parametrize("quant", QUANTS)
def test_macos_exports_pass_their_fidelity_gates(coreml_exports, tiny_model, tmp_path, quant):
    proc, report = check(coreml_exports[quant], tiny_model, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["thresholds"] and report["pass"]
    assert {r["sample"] for r in report["samples"]} >= {"circle", "video", "text"}
