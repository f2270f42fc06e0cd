"""`pocketvlm make-model`: complete SmolVLM2 folders at a preset's exact shape, with random weights and a locally
trained tokenizer -- or, for the micro preset with --train, trained on the synthetic image-QA set (train.py)."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .errors import PocketVLMError
from .manifest import atomic_output, write_manifest
from .presets import image_seq_len, preset, preset_names


def make_model(out: Path, preset_name: str, *, seed: int = 0, force: bool = False, progress: bool = True,
               train: bool = False, init_std: float | None = None) -> Path:
    """Write a complete SmolVLM2 folder at a preset's exact shape: random weights, or (train=True, micro preset)
    trained on the synthetic image-QA set. Returns OUT. init_std overrides the preset's weight scale (every
    preset uses 0.02, the ordinary initialisation of the real checkpoints: small logits, near-ties common)."""
    import torch
    from transformers.utils import logging as hf_logging

    p = preset(preset_name)
    if init_std is not None:
        p = {**p, "init_std": float(init_std)}
    if train and "train" not in p:
        trainable = [n for n in preset_names() if "train" in preset(n)]
        raise PocketVLMError(f"preset {preset_name!r} has no training recipe; --train works with: "
                             f"{', '.join(trainable)}")
    if not progress:
        hf_logging.disable_progress_bar()
    with atomic_output(Path(out), force=force) as scratch:
        tokenizer = _build_tokenizer(p, seed)
        model = _random_model(p, tokenizer, seed, progress)
        tokenizer.save_pretrained(scratch)
        _write_processor_files(scratch, p)
        extra = {}
        if train:
            from .train import train as train_model

            model.save_pretrained(scratch)  # the processor reads config.json while encoding training data
            _finish_config(scratch / "config.json", p)
            extra["train"] = train_model(model, scratch, p["train"], seed=seed, progress=progress)
        if p.get("save_dtype"):
            model = model.to(getattr(torch, p["save_dtype"]))
        model.save_pretrained(scratch)
        _finish_config(scratch / "config.json", p)
        if train:
            extra["train"]["heldout"] = _evaluate(scratch, p["train"], progress)
        write_manifest(
            scratch, format="hf",
            quant={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.dtype],
            source={"id": f"preset:{preset_name}", "revision": None, "seed": seed, "init_std": p["init_std"]},
            tools=_tool_versions(),
            **extra,
        )
    return Path(out)


def _evaluate(folder: Path, cfg: dict, progress: bool) -> dict:
    import sys

    from .evaluate import heldout_accuracy
    from .runtime.reference import ReferenceBackend

    result = heldout_accuracy(ReferenceBackend(folder), cfg["heldout"], progress=progress)
    if result["accuracy"] < cfg["target_accuracy"]:
        print(f"pocketvlm: warning: held-out accuracy {result['accuracy']:.1%} is below the target "
              f"{cfg['target_accuracy']:.0%}", file=sys.stderr)
    return result


def _build_tokenizer(p: dict, seed: int):
    from .tokenizer import build_tokenizer

    return build_tokenizer(p["tokenizer"], seed=seed)


def preset_config(p: dict, tokenizer):
    """The SmolVLMConfig of a preset, with the token ids of `tokenizer`."""
    from transformers import SmolVLMConfig

    t, v = p["text"], p["vision"]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = SmolVLMConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
            head_dim=t["hidden_size"] // t["num_attention_heads"],
            max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"]},
            tie_word_embeddings=False, **ids,
        ),
        vision_config=dict(model_type="smolvlm_vision", num_channels=3, layer_norm_eps=1e-6, **v),
        scale_factor=p["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        **ids,
    )
    # llama.cpp's converter routes the text model by this name, as in the published checkpoints.
    config.text_config.architectures = ["VLlama3ForCausalLM"]
    return config


def _random_model(p: dict, tokenizer, seed: int, progress: bool):
    import torch
    from tqdm import tqdm
    from transformers import SmolVLMForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = preset_config(p, tokenizer)
    dtype = getattr(torch, p["dtype"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():  # every weight is filled below; skip transformers' own (slow) init
            model = SmolVLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()

    # Deterministic: one generator, parameters in a fixed order. Matrices ~ N(0, init_std); norms 1; biases 0.
    generator = torch.Generator().manual_seed(seed)
    params = sorted(model.named_parameters())
    bar = tqdm(params, desc=f"init {sum(x.numel() for _, x in params) / 1e6:.0f}M params", unit="tensor",
               disable=not progress, leave=False)
    with torch.no_grad():
        for name, param in bar:
            if param.dim() >= 2:
                param.normal_(0.0, p["init_std"], generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _finish_config(path: Path, p: dict) -> None:
    # transformers 5 writes rope_parameters only; mlx-vlm and llama.cpp's converter read text_config.rope_theta
    # (mlx-vlm silently falls back to 1e6 without it), so write both as the published checkpoints do.
    config = json.loads(path.read_text())
    config["text_config"]["rope_theta"] = p["text"]["rope_theta"]
    path.write_text(json.dumps(config, indent=2) + "\n")


def _write_processor_files(root: Path, p: dict) -> None:
    """The processor files of a SmolVLM2 checkpoint, written as data.

    transformers' SmolVLMProcessor cannot be built here (its video processor needs torchvision), so the files are
    written directly; they name SmolVLMProcessor so AutoProcessor loads them wherever torchvision exists.
    """
    image = p["image"]
    preprocessor = {
        "image_processor_type": "SmolVLMImageProcessor",
        "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": image["max_image_size"]},
        "resample": 1,  # LANCZOS
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": image["longest_edge"]},
        "video_sampling": {"fps": p["video"]["fps"], "max_frames": p["video"]["max_frames"],
                           "video_size": {"longest_edge": image["longest_edge"]}},
    }
    (root / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {"processor_class": "SmolVLMProcessor", "image_seq_len": image_seq_len(p)}
    (root / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _tool_versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"pocketvlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}
