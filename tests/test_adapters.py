"""One base on the device, many small adapters (issue 19): a `pocketvlm finetune` adapter exported to GGUF and MLX
and applied at run time (`ask BASE --adapter ADAPTER`) answers as the merged model does -- and every way to pair the
wrong things is one line."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SAMPLES, assert_user_error, run_cli

MICRO = SAMPLES / "micro"
QUESTIONS = 12


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short fine-tune of the micro model on colours in French: enough to change its answers."""
    from pocketvlm.synthetic import task_cycle, write_finetune_data, write_split

    root = tmp_path_factory.mktemp("adapters")
    data = write_finetune_data(root / "data", 160, 3, task_cycle({"french": 2, "color": 1}))
    split = write_split(root / "french", QUESTIONS, 4, ("french",))
    out = root / "tuned"
    proc = run_cli("finetune", MICRO, "--data", data, "--out", out, "--target", "text", "--rank", "8", "--alpha",
                   "16", "--lr", "5e-3", "--batch", "8", "--max-steps", "60", "--eval-split", "0.1", "--quiet",
                   timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return root, out, split


def export(source, fmt, out, *extra):
    proc = run_cli("export", source, "--to", fmt, "--out", out, "--quiet", *extra, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return out


def answers(backend, split) -> list[list[int]]:
    from pocketvlm.evaluate import load_samples

    return [backend.run(s.request, 6).token_ids for s in load_samples(split)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, quant, engine", [("gguf", "f16", "llama_cpp"), ("mlx", "fp32", "mlx_vlm")])
def test_base_plus_adapter_answers_as_the_merged_model(tuned, fmt, quant, engine):
    pytest.importorskip(engine)
    from pocketvlm.runtime import open_backend

    root, out, split = tuned
    base = export(MICRO, fmt, root / f"base-{fmt}", "--quant", quant)
    merged = export(out, fmt, root / f"merged-{fmt}", "--quant", quant)
    adapter = export(out / "adapter", fmt, root / f"adapter-{fmt}")
    manifest = json.loads((adapter / "pocketvlm.json").read_text())
    assert manifest["adapter"]["type"] == "lora" and manifest["adapter"]["rank"] == 8
    with_adapter = answers(open_backend(base, adapter=adapter), split)
    assert with_adapter == answers(open_backend(merged), split)
    assert with_adapter != answers(open_backend(base), split)  # the adapter really changed the answers
    proc = run_cli("ask", base, "What color is the circle, in French?", "--adapter", adapter, "--image",
                   SAMPLES / "heldout" / "images" / "000-color.png", "--max-tokens", 4, "--json")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_pairing_the_wrong_things_is_one_line(tuned, tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    root, out, _ = tuned
    adapter = root / "adapter-gguf"
    if not adapter.exists():
        export(out / "adapter", "gguf", adapter)
    q = "What color is it?"
    assert_user_error(run_cli("ask", adapter, q), "is a LoRA adapter, not a model", "--adapter")
    onnx = export(MICRO, "onnx", tmp_path / "onnx")
    assert_user_error(run_cli("ask", onnx, q, "--adapter", adapter), "--adapter needs a gguf or mlx base")
    other = export(tiny_model, "gguf", tmp_path / "tiny-gguf")
    assert_user_error(run_cli("ask", other, q, "--adapter", adapter), "another base model")
    assert_user_error(run_cli("export", out / "adapter", "--to", "onnx", "--out", tmp_path / "x"),
                      "adapters export to gguf and mlx")
    assert_user_error(run_cli("export", out / "adapter", "--to", "gguf", "--quant", "q8_0", "--out", tmp_path / "x"),
                      "do not apply to an adapter")
    dora = tmp_path / "dora"
    shutil.copytree(out / "adapter", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert_user_error(run_cli("export", dora, "--to", "gguf", "--out", tmp_path / "x"), "DoRA")
    vision = tmp_path / "vision"
    shutil.copytree(out / "adapter", vision)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(vision / "adapter_model.safetensors"))
    a = next(k for k in tensors if "lora_A" in k)
    module = "base_model.model.model.vision_model.encoder.layers.0.mlp.fc1"  # a vision LoRA pair of the same rank
    tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = tensors[a], tensors[
        a.replace("lora_A", "lora_B")]
    save_file(tensors, str(vision / "adapter_model.safetensors"))
    assert_user_error(run_cli("export", vision, "--to", "gguf", "--out", tmp_path / "x"),
                      "adapts the vision too", "text model only")
    saved_head = tmp_path / "saved-head"  # peft's save_embedding_layers: the base's own head beside the pairs
    shutil.copytree(out / "adapter", saved_head)
    tensors = load_file(str(saved_head / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.base_layer.weight"] = tensors[a]
    save_file(tensors, str(saved_head / "adapter_model.safetensors"))
    assert_user_error(run_cli("export", saved_head, "--to", "mlx", "--out", tmp_path / "x"),
                      "a copy of the base's own layer", "save_embedding_layers=False")
    assert not (tmp_path / "x").exists()


def test_an_adapter_that_is_not_there_or_a_base_that_takes_none_is_one_line(tmp_path):
    q = "What color is it?"
    assert_user_error(run_cli("ask", MICRO, q, "--adapter", tmp_path / "missing"), "no such folder")
    (tmp_path / "file").write_text("x")
    assert_user_error(run_cli("ask", MICRO, q, "--adapter", tmp_path / "file"), "no such folder")
    assert_user_error(run_cli("ask", MICRO, q, "--adapter", MICRO), "--adapter needs a gguf or mlx base artifact")
    assert_user_error(run_cli("serve", MICRO, "--adapter", tmp_path / "missing", "--port", "0"), "no such folder")


@pytest.mark.parametrize("fmt, quant, engine", [("gguf", "f16", "llama_cpp"), ("mlx", "fp32", "mlx_vlm")])
def test_an_adapter_applies_where_the_mlp_is_wider_than_the_model(fmt, quant, engine, tiny_model, tmp_path):
    """The tiny model's MLP is 192 wide, its hidden size 128 (the real models' ffn_down reads 1536 or 2560 from a
    576- or 960-wide model): ffn_down's lora_a reads the intermediate width, every other pair the hidden one. The
    adapter applied at run time answers as the merged export does."""
    pytest.importorskip(engine)
    pytest.importorskip("peft")
    from pocketvlm.runtime import open_backend
    from pocketvlm.synthetic import task_cycle, write_finetune_data, write_split

    config = json.loads((tiny_model / "config.json").read_text())["text_config"]
    assert config["intermediate_size"] != config["hidden_size"]
    rows = write_finetune_data(tmp_path / "data", 16, 3, task_cycle({"color": 1}))
    tuned = tmp_path / "tuned"
    proc = run_cli("finetune", tiny_model, "--data", rows, "--out", tuned, "--target", "text", "--rank", "4",
                   "--lr", "0.05", "--max-steps", "4", "--eval-split", "0", "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr
    base = export(tiny_model, fmt, tmp_path / "base", "--quant", quant)
    merged = export(tuned, fmt, tmp_path / "merged", "--quant", quant)
    adapter = export(tuned / "adapter", fmt, tmp_path / "adapter")
    split = write_split(tmp_path / "split", 6, 4)
    with_adapter = answers(open_backend(base, adapter=adapter), split)
    assert with_adapter == answers(open_backend(merged), split)
    assert with_adapter != answers(open_backend(base), split)  # the adapter really changed the answers


def test_an_adapter_whose_widths_are_another_models_is_refused_naming_the_tensor():
    from pocketvlm.formats.gguf_reader import GGUFInfo, GGUFTensor
    from pocketvlm.runtime.gguf import adapter_shape_problem

    def info(*tensors):
        return GGUFInfo(path=None, version=3, metadata={"general.architecture": "llama"}, data_offset=0, size=0,
                        tensors=[GGUFTensor(n, s, "f32", 0, 0) for n, s in tensors])

    model = info(("blk.0.ffn_down.weight", (512, 192)), ("blk.0.attn_q.weight", (192, 192)))
    good = info(("blk.0.ffn_down.weight.lora_a", (512, 8)), ("blk.0.ffn_down.weight.lora_b", (8, 192)),
                ("blk.0.attn_q.weight.lora_a", (192, 8)), ("blk.0.attn_q.weight.lora_b", (8, 192)))
    assert adapter_shape_problem(good, model) is None
    for bad, fragment in (
            ((("blk.0.ffn_down.weight.lora_a", (192, 8)), ("blk.0.ffn_down.weight.lora_b", (8, 192))), "ffn_down"),
            ((("blk.0.attn_q.weight.lora_a", (192, 8)), ("blk.0.attn_q.weight.lora_b", (8, 256))), "attn_q"),
            ((("blk.0.attn_q.weight.lora_a", (192, 8)), ("blk.0.attn_q.weight.lora_b", (4, 192))), "attn_q"),
            ((("blk.9.attn_q.weight.lora_a", (192, 8)), ("blk.9.attn_q.weight.lora_b", (8, 192))), "no such tensor"),
            ((("blk.0.attn_q.weight.lora_a", (192, 8)),), "only one of")):
        assert fragment in adapter_shape_problem(info(*bad), model)
