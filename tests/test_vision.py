"""Vision encoders (issue 17): every runnable backend's image_features is what its prefill merges, stays within the
per-tile cosine gate of pocketvlm/data/fidelity.json against the reference on the trained micro model, and gives
the same features whatever the tiles-per-call batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, draw_image, run_cli

from pocketvlm.prompt import Request
from pocketvlm.quantize.fidelity import gate, tile_cosines, vision_fidelity
from pocketvlm.runtime import open_backend
from pocketvlm.runtime.base import real_tiles, tile_batches

MICRO = SAMPLES / "micro"
HELDOUT = sorted((SAMPLES / "heldout" / "images").glob("*.png"))[:4]
MULTI_TILE = 384  # image budget at which the micro model (128-px tiles) cuts an image into 3 x 3 tiles + a global one
# one quantized variant per runnable backend, plus the unquantized ones that must be (near) exact
VARIANTS = [("gguf", "f16"), ("gguf", "q4_k_m"), ("onnx", "fp32"), ("onnx", "q4"), ("onnx", "int8"),
            ("mlx", "fp16"), ("mlx", "4bit")]
# an ONNX export traces the model (1-3 minutes on 2 busy cores): those cases are slow-marked


def cases(pairs, ids=None):
    return [pytest.param(f, q, id=(ids or {}).get((f, q), f"{f}-{q}"),
                         marks=[pytest.mark.slow] if f == "onnx" else []) for f, q in pairs]
# what each variant's vision encoder is, as its manifest records it and check prints it
VISION_WEIGHTS = {("gguf", "f16"): "f16", ("gguf", "q4_k_m"): "q8_0", ("onnx", "fp32"): "fp32",
                  ("onnx", "q4"): "int8 per channel (dynamic uint8 activations)",
                  ("onnx", "int8"): "int8 per channel (dynamic uint8 activations)", ("mlx", "fp16"): "float16",
                  ("mlx", "4bit"): "4bit g64"}
INSTALLED = {"gguf": "llama_cpp", "onnx": "onnxruntime", "mlx": "mlx_vlm"}


def requests() -> list[Request]:
    from pocketvlm.media import open_image

    return [Request("What is in the picture?", images=[open_image(p)]) for p in HELDOUT]


@pytest.fixture(scope="module")
def reference():
    return open_backend(MICRO)


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """The micro model exported as a user does it, once per (format, quant) asked for."""
    root = tmp_path_factory.mktemp("vision")
    done: dict[tuple[str, str], Path] = {}

    def get(fmt: str, quant: str) -> Path:
        pytest.importorskip(INSTALLED[fmt])
        if (fmt, quant) not in done:
            out = root / f"{fmt}-{quant}"
            proc = run_cli("export", MICRO, "--to", fmt, "--quant", quant, "--out", out, "--quiet")
            assert proc.returncode == 0, proc.stderr
            done[fmt, quant] = out
        return done[fmt, quant]

    return get


# ------------------------------------------------------------------------------------------ fidelity gate

@pytest.mark.parametrize("fmt,quant", cases(VARIANTS))
def test_image_features_match_the_reference_within_the_gate(export_of, reference, fmt, quant):
    artifact = export_of(fmt, quant)
    limit = gate(fmt, quant).get("vision_cosine_min")
    assert limit is not None, f"fidelity.json has no vision gate for {fmt} {quant}"
    manifest = json.loads((artifact / "pocketvlm.json").read_text())
    backend = open_backend(artifact)
    assert backend.vision_weights == VISION_WEIGHTS[fmt, quant]
    assert backend.describe()["vision"]["weights"] == backend.vision_weights
    if fmt == "gguf":
        assert manifest["gguf"]["mmproj_quant"] == backend.vision_weights
    elif fmt == "onnx":
        assert manifest["onnx"]["quantization"]["vision"] == backend.vision_weights
    else:
        assert manifest["quantization"]["vision"] == backend.vision_weights
    cosines = np.concatenate([vision_fidelity(reference, backend, r) for r in requests()])
    assert len(cosines) == len(HELDOUT) and cosines.min() >= limit, (cosines.min(), limit)
    if quant not in ("fp32", "f16", "fp16"):
        # a quantized vision encoder really is quantized: the gate is not passed by an fp32 tower
        assert cosines.min() < 1 - 1e-7, cosines.min()


def test_the_gate_fails_broken_features(reference):
    """Every vision gate fails features that are half noise (what a wrong scale or transposed weight gives), so
    passing it means something."""
    enc = reference.processor.encode(requests()[0])
    features = reference.image_features(enc)
    rng = np.random.default_rng(0)
    broken = features + rng.normal(0, features.std() * 0.5, features.shape).astype(np.float32)
    for fmt, quant in VARIANTS:
        assert tile_cosines(features, broken).min() < gate(fmt, quant)["vision_cosine_min"]
    assert tile_cosines(features, features).min() > 1 - 1e-12


def test_every_format_and_quant_has_a_vision_gate():
    from pocketvlm import formats

    for name in formats.FORMATS:
        if name == "hf":
            continue
        for quant in formats.get(name).export_quants:
            limit = gate(name, quant).get("vision_cosine_min")
            assert limit is not None and 0.9 <= limit < 1, (name, quant, limit)


def test_check_prints_and_gates_the_vision_encoder(export_of, tmp_path):
    artifact = export_of("gguf", "q4_k_m")
    report_file = tmp_path / "report.json"
    proc = run_cli("check", artifact, "--reference", MICRO, "--report", report_file, "--max-tokens", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vision encoder q8_0" in proc.stdout and "vision" in proc.stdout.splitlines()[1]
    report = json.loads(report_file.read_text())
    assert report["vision_weights"] == "q8_0"
    s = report["summary"]
    assert s["vision_tiles"] > 0 and s["vision_cosine_min"] >= report["thresholds"]["vision_cosine_min"]


# ----------------------------------------------------------------------------------- one code path

PREFILL = [("reference", "fp32"), ("gguf", "q4_k_m"), ("onnx", "int8"), ("mlx", "4bit")]


@pytest.mark.parametrize("fmt,quant", cases(PREFILL, ids={pair: pair[0] for pair in PREFILL}))
def test_prefill_merges_exactly_the_image_features(export_of, reference, fmt, quant):
    """prefill computes the image features with image_features, once, and merges what it returns: replaced
    features change the logits, the real ones give the unpatched logits back."""
    backend = reference if fmt == "reference" else open_backend(export_of(fmt, quant))
    request = requests()[1]
    enc = backend.processor.encode(request)

    def first_logits():
        return np.asarray(next(iter(backend.generate(request, 1, with_logits=True))).logits, dtype=np.float32)

    plain = first_logits()
    real = backend.image_features(enc)
    calls = []

    def spy(e, features=None):
        calls.append(e)
        return real if features is None else features

    backend.image_features = lambda e: spy(e)
    try:
        again = first_logits()
        assert len(calls) == 1
        np.testing.assert_allclose(again, plain, rtol=0, atol=1e-4)
        backend.image_features = lambda e: spy(e, np.zeros_like(real))
        blind = first_logits()
        assert len(calls) == 2 and np.abs(blind - plain).max() > 1e-2
    finally:
        del backend.image_features


# ---------------------------------------------------------------------------------------- tile batching

@pytest.mark.parametrize("fmt,quant", cases([("reference", "fp32"), ("onnx", "fp32"), ("mlx", "fp32")],
                                             ids={("reference", "fp32"): "reference", ("onnx", "fp32"): "onnx",
                                                  ("mlx", "fp32"): "mlx"}))
def test_tile_batches_give_the_same_features(export_of, reference, fmt, quant):
    backend = (open_backend(MICRO, image_size=MULTI_TILE) if fmt == "reference"
               else open_backend(export_of(fmt, quant), image_size=MULTI_TILE))
    enc = backend.processor.encode(Request("Describe it.", images=[draw_image(300, 260)]))
    tiles = enc.pixel_values.shape[1]
    assert tiles == 10
    by_batch = {}
    for batch in (1, 3, tiles):
        backend.vision_batch = batch
        by_batch[batch] = backend.image_features(enc)
    assert by_batch[1].shape[0] == tiles
    for batch in (3, tiles):
        np.testing.assert_allclose(by_batch[batch], by_batch[1], rtol=0, atol=2e-5)
    # tiles are not all alike, so the comparison above would see a tile out of place
    assert np.abs(by_batch[1][0] - by_batch[1][1]).max() > 1e-2


def test_real_tiles_drops_padding_and_tile_batches_cover_all():
    pixels = np.ones((1, 4, 3, 2, 2), np.float32)
    pixels[0, 2] = 0
    masks = np.ones((1, 4, 2, 2), bool)
    tiles, kept = real_tiles(pixels, masks)
    assert tiles.shape == (3, 3, 2, 2) and kept.shape == (3, 2, 2)
    tiles, _ = real_tiles(np.zeros_like(pixels), masks)
    assert tiles.shape[0] == 1  # all padding: the first stays, as transformers keeps it
    assert tile_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert tile_batches(3, 0) == [slice(0, 1), slice(1, 2), slice(2, 3)]
