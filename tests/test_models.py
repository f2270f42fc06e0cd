"""make-model: complete SmolVLM2 folders at the presets' exact shapes, deterministic, atomic."""

from __future__ import annotations

import json

import pytest
from conftest import load_json, run_cli

from pocketvlm.manifest import FILENAME, read_manifest, verify
from pocketvlm.make_model import make_model, preset_config
from pocketvlm.presets import image_seq_len, preset
from pocketvlm.tokenizer import build_tokenizer

SPECIAL = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def test_tiny_is_a_complete_smolvlm2_folder(tiny_model):
    files = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "preprocessor_config.json", "processor_config.json", FILENAME} <= files
    config = load_json(tiny_model / "config.json")
    assert config["model_type"] == "smolvlm"
    assert config["architectures"] == ["SmolVLMForConditionalGeneration"]
    text = config["text_config"]
    assert text["architectures"] == ["VLlama3ForCausalLM"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is False and text["tie_word_embeddings"] is False
    dims = [text["hidden_size"], text["intermediate_size"], text["head_dim"], text["vocab_size"],
            config["vision_config"]["hidden_size"], config["vision_config"]["intermediate_size"]]
    assert all(d % 32 == 0 for d in dims), dims
    assert (tiny_model / "model.safetensors").stat().st_size < 2_000_000
    assert load_json(tiny_model / "processor_config.json") == {"processor_class": "SmolVLMProcessor",
                                                               "image_seq_len": 4}
    assert load_json(tiny_model / "preprocessor_config.json")["processor_class"] == "SmolVLMProcessor"
    manifest = read_manifest(tiny_model)
    assert manifest["format"] == "hf" and manifest["source"]["id"] == "preset:tiny"
    verify(tiny_model, manifest)


def test_tiny_tokenizer_is_smollm2_style_with_smolvlm2_specials(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = load_json(tiny_model / "config.json")
    assert len(tok) == config["text_config"]["vocab_size"]
    vocab = tok.get_vocab()
    for token in SPECIAL:
        assert token in vocab and tok.tokenize(token) == [token], token
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<image>")
    assert load_json(tiny_model / "generation_config.json")["eos_token_id"] == tok.convert_tokens_to_ids(
        "<end_of_utterance>")
    assert len(tok("\n\n", add_special_tokens=False).input_ids) == 1
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]  # digits split one by one
    text = "User: what is 12 + 7?\n\nAssistant: 19 é ü 🙂"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless on any text
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<end_of_utterance>"


def test_make_model_is_deterministic_and_the_seed_matters(tmp_path, tiny_model):
    again = make_model(tmp_path / "again", "tiny", seed=0, progress=False)
    other = make_model(tmp_path / "other", "tiny", seed=1, progress=False)
    sha = lambda d: {f["path"]: f["sha256"] for f in read_manifest(d)["files"]}  # noqa: E731
    assert sha(again)["model.safetensors"] == sha(tiny_model)["model.safetensors"]
    assert sha(again)["tokenizer.json"] == sha(tiny_model)["tokenizer.json"]
    assert sha(other)["model.safetensors"] != sha(tiny_model)["model.safetensors"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import pocketvlm.make_model as models

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models, "_write_processor_files", broken)
    with pytest.raises(OSError, match="disk full"):
        make_model(tmp_path / "out", "tiny", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,params,hub_id", [
    ("256m", (250e6, 262e6), "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
    ("500m", (500e6, 512e6), "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    ("2.2b", (2.2e9, 2.3e9), "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
])
def test_real_presets_have_the_published_shapes_and_token_ids(name, params, hub_id):
    """Config and parameter count of each real-shape preset, on the meta device (no memory, no time)."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    p = preset(name)
    assert p["hub_id"] == hub_id
    tok = build_tokenizer(p["tokenizer"])
    assert len(tok) == 49280
    assert tok.convert_tokens_to_ids("<image>") == 49190
    assert tok.convert_tokens_to_ids("<end_of_utterance>") == 49279
    assert tok.convert_tokens_to_ids("<global-img>") == 49152
    assert tok.convert_tokens_to_ids("<fake_token_around_image>") == 49189
    config = preset_config(p, tok)
    assert config.image_token_id == 49190 and config.text_config.vocab_size == 49280
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(config)
    n = sum(x.numel() for x in model.parameters())
    assert params[0] <= n <= params[1], f"{name}: {n / 1e6:.1f}M parameters"
    expected_tokens = {"256m": 64, "500m": 64, "2.2b": 81}[name]
    assert image_seq_len(p) == model.model.image_seq_len == expected_tokens


@pytest.mark.slow
def test_make_model_256m_builds_and_answers(tmp_path):
    out = tmp_path / "256m"
    proc = run_cli("make-model", out, "--preset", "256m", "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr
    config = load_json(out / "config.json")
    t, v = config["text_config"], config["vision_config"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
            t["intermediate_size"]) == (576, 30, 9, 3, 1536)
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"],
            v["image_size"], v["patch_size"], config["scale_factor"]) == (768, 12, 12, 3072, 512, 16, 4)
    assert config["dtype"] == "bfloat16"
    size = (out / "model.safetensors").stat().st_size
    assert 500e6 < size < 530e6  # bf16, like the published checkpoint
    proc = run_cli("ask", out, "Hello?", "--max-tokens", 3, "--ignore-eos", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)["token_ids"]
    assert len(ids) == 3 and all(0 <= i < 49280 for i in ids)
