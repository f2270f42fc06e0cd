"""Core ML export: a SmolVLM2 checkpoint -> two ML Program packages (+ host-side embedding table, processor files,
pocketvlm.json), in the layout declared in pocketvlm/formats/coreml.py.

No public exporter covers SmolVLM (Apple's FastVLM exports only its vision encoder), so both packages are traced
from wrapper modules around the transformers model (our code, no patches to transformers) with static rewrites of
what coremltools 9 cannot convert, found by trying (torch 2.13, transformers 5.23):
- the vision embeddings' position ids come from torch.bucketize (no Core ML op): tiles are always full squares
  (pocketvlm.prompt makes them so), so the ids are computed once, eagerly, with transformers' own code, and kept
  as a constant;
- the connector's pixel shuffle takes int(seq ** 0.5) of a traced size; here it reshapes with static sizes;
- the Llama attention builds its mask and reshapes its heads from traced sizes (aten::Int, floor_divide), and
  rotary / repeat_kv do too: the decoder is re-written over the same submodules (norms, projections, MLPs) with
  static head counts, rotary angles from position_ids, and the cache written in place at [end - q, end).
fp16 compute; int8 / int4 compress the weights of both packages with coremltools.optimize (quantize/coreml.py).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np

from pocketvlm.artifact import copy_processor_files, note as log, set_image_size, source_record
from pocketvlm.errors import PocketVLMError
from pocketvlm.formats.coreml import (DECODER, DEFAULT_MAX_CONTEXT, EMBEDDINGS, TARGETS, VISION, causal_mask,
                                      import_coremltools, quiet)
from pocketvlm.manifest import atomic_output, check_output
from pocketvlm.models import ModelSource
from pocketvlm.quantize import coreml as qcoreml


def export(source: ModelSource, out: Path, quant: str, *, force: bool = False, progress: bool = True,
           image_size: int | None = None, max_context: int | None = None,
           deployment_target: str | None = None) -> Path:
    config = json.loads((source.path / "config.json").read_text())
    target = check_target(deployment_target)
    context = check_context(config, max_context)
    check_output(out, force=force)  # before the slow imports
    ct = import_coremltools()
    with atomic_output(out, force=force) as scratch:
        copy_processor_files(source.path, scratch)
        budget = set_image_size(scratch, image_size)
        (scratch / "pocketvlm.json").unlink(missing_ok=True)
        seconds = convert(source.path, scratch, context=context, target=target, progress=progress)
        info = None
        if quant != "fp16":
            start = time.perf_counter()
            info = qcoreml.compress_folder(scratch, quant, progress=progress)
            seconds[quant] = round(time.perf_counter() - start, 2)
        qcoreml.finish(scratch, quant, source=source_record(source), ct=ct, quantization=info,
                       export_s=seconds, deployment_target=target, **budget)
    qcoreml.announce(quant)
    return out


def check_target(target: str | None) -> str:
    target = target or "iOS18"
    if target not in TARGETS:
        raise PocketVLMError(f"unsupported Core ML deployment target {target!r}: the stateful KV cache needs "
                             f"{', '.join(TARGETS)} (ML Program states); choose one of those")
    return target


def check_context(config: dict, max_context: int | None) -> int:
    limit = int(config["text_config"]["max_position_embeddings"])
    if max_context is None:
        return min(limit, DEFAULT_MAX_CONTEXT)
    if max_context < 2:
        raise PocketVLMError(f"--max-context {max_context} is too small; give at least a prompt's length")
    if max_context > limit:
        raise PocketVLMError(f"--max-context {max_context} is longer than the model's context "
                             f"(max_position_embeddings = {limit})")
    return int(max_context)


# -------------------------------------------------------------------------------------------- the wrappers

def max_tiles(model_dir: Path) -> int:
    """The most tiles one request gives the vision encoder: a split image's grid + its global view, or a video's
    frames (one tile each)."""
    from pocketvlm.prompt import ProcessorConfig

    cfg = ProcessorConfig.from_dir(model_dir)
    per_side = -(-max(cfg.longest_edge, cfg.max_image_size) // cfg.max_image_size)
    return max(per_side * per_side + 1, cfg.video_max_frames, 1)


def wrappers():
    """The two modules that are traced (built here so importing this module does not import torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VisionEncoder(nn.Module):
        """Full square tiles [tiles, 3, S, S] -> connector output [tiles, image_seq_len, hidden].

        Same math as transformers' get_image_features for full tiles: patch embedding + position embedding,
        encoder (no attention mask: every patch is real), post-layernorm, pixel shuffle, modality projection."""

        def __init__(self, hf):
            super().__init__()
            vision, vc = hf.model.vision_model, hf.config.vision_config
            self.embeddings, self.encoder, self.post_layernorm = (vision.embeddings, vision.encoder,
                                                                  vision.post_layernorm)
            self.projection = hf.model.connector.modality_projection
            self.side = vc.image_size // vc.patch_size
            self.hidden = vc.hidden_size
            self.scale = hf.config.scale_factor
            # transformers' own (bucketize) position ids of one full tile, computed eagerly once
            full = torch.ones(1, self.side, self.side, dtype=torch.bool)
            ids = _vision_position_ids(vision.embeddings, full)
            self.register_buffer("position_ids", ids, persistent=False)

        def pixel_shuffle(self, x):
            n, e, s = self.side, self.hidden, self.scale
            x = x.reshape(-1, n, n // s, e * s).permute(0, 2, 1, 3)
            x = x.reshape(-1, n // s, n // s, e * s * s).permute(0, 2, 1, 3)
            return x.reshape(-1, (n * n) // (s * s), e * s * s)

        def forward(self, pixel_values):
            emb = self.embeddings.patch_embedding(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
            emb = emb.flatten(2).transpose(1, 2) + self.embeddings.position_embedding(self.position_ids)
            hidden = self.encoder(inputs_embeds=emb, attention_mask=None).last_hidden_state
            return self.projection(self.pixel_shuffle(self.post_layernorm(hidden)))

    class TextDecoder(nn.Module):
        """The Llama text model + lm_head with a static KV cache in fp16 buffers (-> Core ML states).

        inputs_embeds [1, q, hidden], position_ids [1, q], causal_mask [1, 1, q, end] -> logits [1, 1, vocab] of
        the last position. The q new keys/values are written at [end - q, end); attention reads [0, end)."""

        def __init__(self, hf, max_context: int):
            super().__init__()
            text, tc = hf.model.text_model, hf.config.text_config
            self.layers, self.norm, self.lm_head = text.layers, text.norm, hf.lm_head
            self.register_buffer("inv_freq", text.rotary_emb.inv_freq.detach().clone().float(), persistent=False)
            self.rope_scaling = float(text.rotary_emb.attention_scaling)
            self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
            self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            shape = (tc.num_hidden_layers, 1, self.kv_heads, max_context, self.head_dim)
            self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

        def reset(self):
            self.k_cache.zero_()
            self.v_cache.zero_()

        def forward(self, inputs_embeds, position_ids, causal_mask):
            end = causal_mask.shape[-1]
            start = end - inputs_embeds.shape[1]
            nh, kvh, hd = self.heads, self.kv_heads, self.head_dim
            half, groups = hd // 2, self.heads // self.kv_heads
            angle = position_ids[..., None].float() * self.inv_freq[None, None, :]
            angle = torch.cat((angle, angle), dim=-1)
            cos = (angle.cos() * self.rope_scaling)[:, None]  # [1, 1, q, head_dim]
            sin = (angle.sin() * self.rope_scaling)[:, None]

            def rope(x):
                return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

            h = inputs_embeds
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = rope(attn.q_proj(x).reshape(1, -1, nh, hd).transpose(1, 2))
                k = rope(attn.k_proj(x).reshape(1, -1, kvh, hd).transpose(1, 2))
                v = attn.v_proj(x).reshape(1, -1, kvh, hd).transpose(1, 2)
                self.k_cache[i, :, :, start:end, :] = k.to(torch.float16)
                self.v_cache[i, :, :, start:end, :] = v.to(torch.float16)
                keys = self.k_cache[i, :, :, :end, :].to(q.dtype).repeat_interleave(groups, dim=1)
                values = self.v_cache[i, :, :, :end, :].to(q.dtype).repeat_interleave(groups, dim=1)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_mask)
                h = h + attn.o_proj(o.transpose(1, 2).reshape(1, -1, nh * hd))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            return self.lm_head(self.norm(h[:, -1:]))

    return VisionEncoder, TextDecoder


def _vision_position_ids(embeddings, patch_attention_mask):
    """The position ids transformers' SmolVLMVisionEmbeddings computes (bucketize on fractional patch coordinates)
    for a patch mask, read off the module's own forward: with the patch convolution zeroed and row r of the
    position table set to (r, 0, 0, ...), channel 0 of its output is each patch's position id. The weights are
    restored afterwards."""
    import torch

    side = patch_attention_mask.shape[1]
    patch = embeddings.patch_embedding
    pixels = torch.zeros(1, patch.in_channels, side * patch.stride[0], side * patch.stride[1])
    table = embeddings.position_embedding
    saved = table.weight.detach().clone()
    saved_patch = (patch.weight.detach().clone(), None if patch.bias is None else patch.bias.detach().clone())
    with torch.no_grad():
        try:
            rows = table.weight.shape[0]
            table.weight.zero_()
            table.weight[:, 0] = torch.arange(rows, dtype=table.weight.dtype)
            patch.weight.zero_()
            if patch.bias is not None:
                patch.bias.zero_()
            out = embeddings(pixel_values=pixels, patch_attention_mask=patch_attention_mask)
        finally:
            table.weight.copy_(saved)
            patch.weight.copy_(saved_patch[0])
            if patch.bias is not None:
                patch.bias.copy_(saved_patch[1])
    return out[..., 0].round().long()  # [1, patches]


def load_hf(model_dir: Path):
    import torch
    from transformers import SmolVLMForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


# ------------------------------------------------------------------------------------------------- export

def convert(model_dir: Path, root: Path, *, context: int, target: str, progress: bool) -> dict:
    """Trace and convert both packages (fp16 compute) into ROOT, and write the embedding table. Seconds per part."""
    import torch

    ct = import_coremltools()
    log(progress, f"loading {model_dir} (fp32)")
    hf = load_hf(model_dir)
    VisionEncoder, TextDecoder = wrappers()
    text, vision = hf.config.text_config, hf.config.vision_config
    deployment = getattr(ct.target, target)
    seconds = {}

    start = time.perf_counter()
    np.save(root / EMBEDDINGS, hf.model.text_model.embed_tokens.weight.detach().numpy().astype(np.float16))
    seconds["embed_tokens"] = round(time.perf_counter() - start, 2)

    log(progress, "converting the vision encoder ...")
    start = time.perf_counter()
    side = vision.image_size
    # the tile range of the artifact's own processor files (its image budget), copied into root first
    tiles = ct.RangeDim(lower_bound=1, upper_bound=max_tiles(root), default=1, symbol="tiles")
    with torch.no_grad(), quiet():
        traced = torch.jit.trace(VisionEncoder(hf).eval(), (torch.randn(2, 3, side, side),), check_trace=False)
        ml = ct.convert(traced, inputs=[ct.TensorType(name="pixel_values", shape=(tiles, 3, side, side),
                                                      dtype=np.float32)],
                        outputs=[ct.TensorType(name="image_features", dtype=np.float32)],
                        minimum_deployment_target=deployment, compute_precision=ct.precision.FLOAT16,
                        convert_to="mlprogram", skip_model_load=True)
    ml.short_description = "SmolVLM2 vision encoder + connector: full tiles -> image features"
    ml.save(str(root / VISION))
    del ml, traced
    seconds["vision_encoder"] = round(time.perf_counter() - start, 2)
    log(progress, f"converted the vision encoder in {seconds['vision_encoder']:.1f}s")

    # the decoder reads neither the vision tower nor the embedding table (saved above): free them before
    # coremltools makes its copies of the decoder's weights, the export's peak (2.2B: ~2 GB of fp32 weights)
    del hf.model.vision_model, hf.model.connector
    hf.model.text_model.embed_tokens = None
    gc.collect()
    log(progress, "converting the text decoder (stateful KV cache) ...")
    start = time.perf_counter()
    decoder = TextDecoder(hf, context).eval()
    q = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="q")
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="end")
    example = (torch.randn(1, 3, text.hidden_size), torch.arange(4, 7)[None], torch.from_numpy(causal_mask(3, 7)))
    cache = tuple(decoder.k_cache.shape)
    with torch.no_grad(), quiet():
        traced = torch.jit.trace(decoder, example, check_trace=False)
        decoder.reset()
        ml = ct.convert(
            traced,
            inputs=[ct.TensorType(name="inputs_embeds", shape=(1, q, text.hidden_size), dtype=np.float32),
                    ct.TensorType(name="position_ids", shape=(1, q), dtype=np.int32),
                    ct.TensorType(name="causal_mask", shape=(1, 1, q, end), dtype=np.float32)],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name="k_cache"),
                    ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name="v_cache")],
            minimum_deployment_target=deployment, compute_precision=ct.precision.FLOAT16, convert_to="mlprogram",
            skip_model_load=True)
    ml.short_description = "SmolVLM2 text decoder with a stateful KV cache: embeddings -> last-position logits"
    ml.save(str(root / DECODER))
    del ml, traced, decoder, hf
    seconds["text_decoder"] = round(time.perf_counter() - start, 2)
    log(progress, f"converted the text decoder in {seconds['text_decoder']:.1f}s")
    return seconds
