"""The image budget (--image-size): the longest edge images are resized to before tiling. Exported as the artifact's
default (its processor config + manifest), honoured by every backend, by mlx-vlm's own loader and by transformers.js
-- the same token ids and pixels -- and overridable at run time on ask / check / demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_user_error, draw_image, load_json, run_cli
from PIL import Image

from pocketvlm.prompt import Processor, Request

QUESTION = "What color is the circle?"
JS_DIR = REPO / "tests" / "js"
NODE = shutil.which("node")
ENGINES = {"gguf": "llama_cpp", "onnx": "onnxruntime", "mlx": "mlx_vlm"}
QUANT = {"gguf": "f16", "onnx": "fp32", "mlx": "fp32"}


def test_the_budget_sets_the_tiles_as_transformers_does(tiny_model):
    """tiny: 64 px tiles, default longest edge 128 -> a 200x150 picture is 2x2 tiles + a global view; at 64 it is one
    tile. transformers' own image processor, given the same longest edge, makes the same pixels."""
    from transformers import SmolVLMImageProcessorPil

    image = draw_image(200, 150)
    default = Processor(tiny_model).encode(Request(QUESTION, images=[image]))
    one = Processor(tiny_model, image_size=64).encode(Request(QUESTION, images=[image]))
    assert default.tiles == 5 and one.tiles == 1
    seq = Processor(tiny_model).config.image_seq_len
    image_id = Processor(tiny_model).image_token_id
    assert int((one.input_ids == image_id).sum()) == seq and int((default.input_ids == image_id).sum()) == 5 * seq
    hf = SmolVLMImageProcessorPil.from_pretrained(tiny_model, size={"longest_edge": 64})
    theirs = hf(images=[[image]], return_tensors="np")
    np.testing.assert_array_equal(theirs["pixel_values"], one.pixel_values)


@pytest.fixture(scope="module")
def budget_exports(tiny_model, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("budget")
    for fmt, engine in ENGINES.items():
        try:
            __import__(engine)
        except ImportError:
            continue
        path = root / fmt
        proc = run_cli("export", tiny_model, "--to", fmt, "--quant", QUANT[fmt], "--out", path, "--image-size", 64,
                       "--quiet")
        assert proc.returncode == 0, proc.stderr
        out[fmt] = path
    return out


@pytest.mark.parametrize("fmt", list(ENGINES))
def test_every_backend_tiles_as_the_artifact_says_and_can_be_overridden(budget_exports, reference, tiny_model,
                                                                        image_file, fmt):
    if fmt not in budget_exports:
        pytest.skip(f"{ENGINES[fmt]} is not installed")
    art = budget_exports[fmt]
    assert load_json(art / "pocketvlm.json")["image_size"] == 64
    assert load_json(art / "preprocessor_config.json")["size"]["longest_edge"] == 64
    nested = load_json(art / "processor_config.json").get("image_processor")
    assert nested is None or nested["size"]["longest_edge"] == 64  # the copy AutoProcessor prefers, if any
    proc = run_cli("ask", art, QUESTION, "--image", image_file, "--max-tokens", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    seq = reference.processor.config.image_seq_len
    assert got["image_tiles"] == 1 and got["image_tokens"] == seq
    from pocketvlm.runtime import open_backend

    request = Request(QUESTION, images=[Image.open(image_file)])
    ref64 = open_backend(tiny_model, image_size=64)
    assert open_backend(art).prompt_token_ids(request) == ref64.prompt_token_ids(request)
    # the run-time budget wins over the artifact's
    proc = run_cli("ask", art, QUESTION, "--image", image_file, "--max-tokens", 2, "--json", "--image-size", 128)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image_tiles"] == 5
    assert f"1 tile / {seq} image tok" in run_cli("ask", art, QUESTION, "--image", image_file, "--max-tokens",
                                                  2).stderr


def test_check_compares_at_the_artifacts_budget(budget_exports, tmp_path):
    if "onnx" not in budget_exports:
        pytest.skip("onnxruntime is not installed")
    proc = run_cli("check", budget_exports["onnx"], "--max-tokens", 4, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_json(tmp_path / "r.json")["image_size"] == 64


def test_mlx_vlm_loads_the_budget_from_the_artifact(budget_exports):
    if "mlx" not in budget_exports:
        pytest.skip("mlx-vlm is not installed")
    from mlx_vlm import load
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    model, processor = load(str(budget_exports["mlx"]))
    image = draw_image(200, 150)
    prompt = apply_chat_template(processor, model.config, QUESTION, num_images=1)
    theirs = prepare_inputs(processor, images=[image], prompts=prompt, image_token_index=model.config.image_token_index)
    ours = Processor(budget_exports["mlx"]).encode(Request(QUESTION, images=[image]))
    assert ours.tiles == 1
    assert np.array(theirs["input_ids"])[0].tolist() == ours.input_ids.tolist()
    np.testing.assert_array_equal(np.array(theirs["pixel_values"]), ours.pixel_values)


@pytest.mark.skipif(NODE is None, reason="node is not installed: the transformers.js check needs Node.js 20+")
@pytest.mark.skipif(not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir(),
                    reason="transformers.js is not installed in tests/js/node_modules "
                           "(run: ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix tests/js)")
def test_transformers_js_tiles_as_the_artifact_says(budget_exports, tmp_path):
    if "onnx" not in budget_exports:
        pytest.skip("onnxruntime is not installed")
    solid = tmp_path / "solid.png"  # a solid colour: the same pixels under any resampler (see test_onnx)
    Image.new("RGB", (200, 150), (200, 60, 40)).save(solid)
    proc = subprocess.run([NODE, "--import", str(JS_DIR / "netguard.mjs"), str(JS_DIR / "generate.mjs"),
                           str(budget_exports["onnx"]), str(solid), QUESTION, "2"], capture_output=True, text=True,
                          timeout=300, cwd=JS_DIR, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = Processor(budget_exports["onnx"]).encode(Request(QUESTION, images=[Image.open(solid)]))
    assert js["prompt_ids"] == ours.input_ids.tolist()
    assert js["pixel_values_shape"] == list(ours.pixel_values.shape) and ours.tiles == 1


@pytest.mark.parametrize("value", ["0", "-5", "5000", "big", "1.5"])
def test_a_bad_budget_is_one_line(tiny_model, image_file, tmp_path, value):
    assert_user_error(run_cli("ask", tiny_model, QUESTION, "--image", image_file, "--image-size", value),
                      "--image-size")
    assert_user_error(run_cli("export", tiny_model, "--to", "onnx", "--out", tmp_path / "x", "--image-size", value),
                      "--image-size")
    assert not Path(tmp_path / "x").exists()
