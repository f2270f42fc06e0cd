"""ONNX export: a SmolVLM2 checkpoint -> the three-part layout of Hugging Face's SmolVLM ONNX repos (the one
transformers.js loads), + processor files and pocketvlm.json. The layout is declared in pocketvlm/formats/onnx.py.

No public exporter covers SmolVLM, so the graphs are traced here from three small wrapper modules around the
transformers model (our code, no patches to transformers) with torch.onnx's dynamo exporter and dynamic shapes (the
TorchScript exporter fails on this architecture). Found by trying (torch 2.13, transformers 5.23, onnxruntime 1.32):
- a dimension whose example size is 1 gets specialised, so every example has batch 2 and several tiles/tokens;
- transformers' get_image_features drops all-zero (padding) tiles, a data-dependent shape; the graph encodes every
  tile it is given and the caller drops padding tiles first (runtime/onnx.py does; transformers.js never pads one
  image); the patch mask is computed with reshape + sum instead of unfold, cropped first where the patch size
  does not divide the tile (2.2B), and torch.bucketize (patch position ids) is traced as a comparison count: the
  exporter's binary-search version gathers out of range for 26 boundaries (2.2B), failing at run time;
- torch and onnx disagree on a float arange's length (2.2B's boundaries: 27 in torch, 26 folded in float32); the
  shapes torch recorded downstream of it are dropped, or onnx's shape inference (onnxruntime's quantizers run it)
  refuses the graph;
- the exporter names weights val_<n>; they are renamed after the transformers parameter they hold (`<name>.T` when
  transposed for MatMul) and node metadata (stack traces with local paths) is dropped;
- traced as-is, transformers' attention (repeat_kv + sdpa) copies the whole KV cache three to four times per layer
  per token; the text model is switched to _grouped_attention (registered through transformers' AttentionInterface),
  which broadcasts the shared K/V heads instead;
- traced as-is, the vision tower's sdpa with a boolean patch mask becomes Where(mask, 0, -inf) + Softmax + a NaN
  guard (IsNaN + Where) over every layer's [tiles, heads, patches, patches] scores, ~25% of a tile's time in
  onnxruntime; the vision tower is switched to transformers' eager attention (an additive mask with the dtype's
  finite minimum, so no row can come out NaN and no guard is traced);
- every graph keeps its weights in <file>.onnx_data, so models over 2 GB (2.2B) need no special case.
int8/q4/fp16 are made from the fp32 graphs with onnxruntime's tools (quantize/onnx.py).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from pocketvlm.artifact import copy_processor_files, run_step, set_image_size, source_record
from pocketvlm.formats.onnx import part_file
from pocketvlm.manifest import atomic_output
from pocketvlm.models import ModelSource
from pocketvlm.quantize import onnx as qonnx

OPSET = 18


def export(source: ModelSource, out: Path, quant: str, *, force: bool = False, progress: bool = True,
           image_size: int | None = None) -> Path:
    with atomic_output(out, force=force) as scratch:
        copy_processor_files(source.path, scratch)
        budget = set_image_size(scratch, image_size)
        (scratch / "pocketvlm.json").unlink(missing_ok=True)
        fp32_root = scratch if quant == "fp32" else scratch / ".fp32"
        # traced in a process of its own: the fp32 checkpoint and the traced programs leave memory with it, before
        # the quantization reads the parts back from disk (pocketvlm.artifact.run_step says why)
        seconds = run_step("pocketvlm.export.onnx", "export_fp32",
                           {"model_dir": str(source.path), "root": str(fp32_root)}, progress=progress,
                           what="the ONNX trace")
        parts = {}
        if quant != "fp32":
            start = time.perf_counter()
            parts = qonnx.convert_artifact(fp32_root, scratch, quant, progress=progress)
            seconds[quant] = round(time.perf_counter() - start, 2)
            shutil.rmtree(fp32_root)
        qonnx.finish(scratch, quant, source=source_record(source), tools=tools(), parts=parts, export_s=seconds,
                     **budget)
    return out


def tools() -> dict:
    import onnxscript
    import torch
    import transformers

    return {**qonnx.tools(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxscript": onnxscript.__version__}


# -------------------------------------------------------------------------------------------- the wrappers

def _wrappers():
    """The three modules that are traced. Their attributes mirror transformers' module paths (model.text_model,
    model.vision_model, model.connector, lm_head), so the exporter's name scopes are the checkpoint's names."""
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode
    from transformers.cache_utils import DynamicCache

    class BucketizeByComparison(TorchFunctionMode):
        """torch.bucketize as a count of boundaries passed: the same numbers, without the exporter's binary-search
        decomposition, whose gathers run out of range when the boundary count is not 2^k - 1 (2.2B: 26)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.bucketize and not kwargs.get("out_int32") and not kwargs.get("sorter"):
                values, boundaries = args[0], args[1]
                passed = boundaries <= values[..., None] if kwargs.get("right") else boundaries < values[..., None]
                return passed.sum(dim=-1)
            return func(*args, **kwargs)

    class Parts(nn.Module):
        """A namespace holding the submodules one wrapper uses under their transformers names."""

        def __init__(self, **modules):
            super().__init__()
            for name, module in modules.items():
                self.add_module(name, module)

    class VisionEncoder(nn.Module):
        """pixel_values [batch, tiles, 3, S, S] + bool mask [batch, tiles, S, S] -> [batch*tiles, seq, hidden]."""

        def __init__(self, hf):
            super().__init__()
            self.model = Parts(vision_model=hf.model.vision_model, connector=hf.model.connector)
            self.patch = hf.config.vision_config.patch_size

        def forward(self, pixel_values, pixel_attention_mask):
            b, n, c, h, w = pixel_values.shape
            pixels = pixel_values.reshape(b * n, c, h, w)
            # a patch is real if any of its pixels is (transformers: unfold(...).sum() > 0); like unfold and the
            # patch convolution, drop the edge a patch does not fit in (2.2B: 384-pixel tiles, 14-pixel patches)
            p, hp, wp = self.patch, h // self.patch, w // self.patch
            mask = pixel_attention_mask.reshape(b * n, h, w)[:, :hp * p, :wp * p]
            patch_mask = mask.reshape(b * n, hp, p, wp, p).to(torch.int32).sum(dim=(2, 4)) > 0
            with BucketizeByComparison():  # the patch position ids (SmolVLMVisionEmbeddings)
                hidden = self.model.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask)
            hidden = hidden.last_hidden_state
            return self.model.connector(hidden)

    class EmbedTokens(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.model = Parts(text_model=Parts(embed_tokens=hf.model.text_model.embed_tokens))

        def forward(self, input_ids):
            return self.model.text_model.embed_tokens(input_ids)

    class Decoder(nn.Module):
        """inputs_embeds + attention_mask + position_ids + flat KV cache -> logits + the grown KV cache."""

        def __init__(self, hf):
            super().__init__()
            self.model = Parts(text_model=hf.model.text_model)
            self.lm_head = hf.lm_head
            self.layers = hf.config.text_config.num_hidden_layers

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.model.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (self.lm_head(out.last_hidden_state), *present)

    return VisionEncoder, EmbedTokens, Decoder


ATTENTION = "pocketvlm_grouped"


def _grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The text model's attention, traced for decoding on a growing KV cache: query heads grouped over their shared
    K/V head (a broadcast matmul) instead of transformers' repeat_kv, and the scale applied to the scores. Traced,
    repeat_kv + sdpa copy the whole cache three to four times per layer per token (expand, transpose, scale), which
    dominated decode time at image-prompt lengths. Same arithmetic as transformers' eager attention, with its
    additive mask (eager_mask, built once per graph): masked_fill with sdpa's boolean mask traced to a Where over
    every layer's scores, a third of the prefill's time in onnxruntime at 877 prompt tokens."""
    import torch

    b, h, s, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    groups = h // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, kv_heads, groups * s, d)  # head i reads K/V head i // groups
    scores = (torch.matmul(q, key.transpose(-1, -2)) * scaling).reshape(b, h, s, t)
    if attention_mask is None:  # causal, no padding (transformers may skip the mask outside tracing)
        attention_mask = torch.ones(s, t, dtype=torch.bool, device=query.device).tril(t - s)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :t]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(b, kv_heads, groups * s, t), value).reshape(b, h, s, d)
    return out.transpose(1, 2).contiguous(), None


def _choose_attention(hf) -> None:
    """Register _grouped_attention through transformers' public AttentionInterface (with eager's additive mask) and
    switch the text model to it; the vision tower to transformers' own eager attention. The vision tower's mask
    only pads keys (tiles are never all padding: the caller drops those), so eager's finite minimum gives the same
    softmax as sdpa's -inf without sdpa's NaN guard: one-tile int8 encode at the 500M shape 0.67 -> 0.44 s, median
    (docs/BENCH.md "Vision attention")."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, _grouped_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    hf.model.text_model.set_attn_implementation(ATTENTION)
    hf.model.vision_model.set_attn_implementation("eager")


# ------------------------------------------------------------------------------------------------- export

def export_fp32(model_dir: Path | str, root: Path | str, *, progress: bool) -> dict:
    """Trace the three parts of the checkpoint in MODEL_DIR into ROOT/onnx/ (fp32). Returns seconds per part."""
    import torch

    model_dir, root = Path(model_dir), Path(root)
    from transformers import SmolVLMForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    qonnx.log(progress, f"loading {model_dir} (fp32)")
    hf = SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    _choose_attention(hf)
    params = dict(hf.named_parameters())
    VisionEncoder, EmbedTokens, Decoder = _wrappers()
    text, vision = hf.config.text_config, hf.config.vision_config
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    Dim = torch.export.Dim
    batch, tiles = Dim("batch_size"), Dim("num_images")
    seq, past_len, total = Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    gen = torch.Generator().manual_seed(0)

    # examples: batch 2 and sizes > 1 everywhere, a padded tile and a left-padded row (see the module doc)
    side = vision.image_size
    pixels = torch.randn(2, 3, 3, side, side, generator=gen)
    pixel_mask = torch.ones(2, 3, side, side, dtype=torch.bool)
    pixel_mask[1, 2, side // 2:, :] = False
    ids = torch.randint(0, text.vocab_size, (2, 7), generator=gen)
    B, S, P = 2, 3, 5
    mask = torch.ones(B, P + S, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    past = [torch.randn(B, kv_heads, P, head_dim, generator=gen) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    jobs = [
        ("vision_encoder", VisionEncoder(hf), (pixels, pixel_mask),
         ["pixel_values", "pixel_attention_mask"], ["image_features"],
         {"pixel_values": {0: batch, 1: tiles}, "pixel_attention_mask": {0: batch, 1: tiles}}),
        ("embed_tokens", EmbedTokens(hf), (ids,), ["input_ids"], ["inputs_embeds"],
         {"input_ids": {0: batch, 1: seq}}),
        ("decoder_model_merged", Decoder(hf), (torch.randn(B, S, text.hidden_size, generator=gen), mask, positions,
                                               *past),
         ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names],
         {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
          "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}),
    ]
    seconds = {}
    for n, (part, module, args, inputs, outputs, dynamic) in enumerate(jobs, 1):
        qonnx.log(progress, f"exporting {part} ({n}/{len(jobs)}, torch.onnx dynamo) ...")
        start = time.perf_counter()
        model = _trace(module.eval(), args, inputs, outputs, dynamic, progress)
        _tidy(model, params)
        _drop_stale_shapes(model)
        qonnx.save(model, root / part_file("fp32", part))
        del model
        seconds[part] = round(time.perf_counter() - start, 2)
        qonnx.log(progress, f"exported {part} in {seconds[part]:.1f}s")
    return seconds


def _trace(module, args, inputs, outputs, dynamic, progress: bool):
    """torch.onnx's dynamo exporter; its own chatter and warnings go to stderr only with progress."""
    import torch

    chatter = io.StringIO()
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms" x4
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(sys.stderr if progress else chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, optimize=True,
                                        verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model


def _drop_stale_shapes(model) -> int:
    """Drop the traced shape of every value computed from a constant the optimizer folded to another shape, and
    give the constant its real one. torch and onnx disagree on float arange lengths: the vision tower's patch
    boundaries, arange(1/27, 1, 1/27) at 2.2B, have 27 elements in torch (which records that shape downstream) and
    26 once folded in float32. The graph computes the same buckets (the extra boundary is 1.0, never reached), but
    onnx's shape inference, which onnxruntime's quantizers run, rejects annotations that disagree. Returns how many
    values lost their traced shape."""
    stale = []
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.shape is not None \
                and tuple(value.shape) != tuple(value.const_value.shape):
            value.shape = value.const_value.shape
            stale.append(value)
    dropped, seen = 0, set()
    while stale:
        for node in stale.pop().consumers():
            for out in node.outputs:
                if id(out) in seen or out.is_graph_output():
                    continue
                seen.add(id(out))
                if out.shape is not None:
                    out.shape, dropped = None, dropped + 1
                stale.append(out)
    return dropped


def _tidy(model, params: dict) -> None:
    """Name weights after the transformers parameters they hold; drop node metadata (stack traces, local paths)."""
    users: dict[str, list] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name in model.graph.initializers:
                users.setdefault(value.name, []).append(node)
    renames = {}
    for name, nodes in users.items():
        node = nodes[0]
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if len(nodes) != 1 or not scopes or node.op_type not in ("MatMul", "Gather", "Conv"):
            continue
        try:
            module = ast.literal_eval(scopes)[-2]
        except (ValueError, SyntaxError, IndexError):
            continue
        param = params.get(f"{module}.weight")
        value = model.graph.initializers[name]
        if param is None or value.const_value is None:
            continue
        array, expected = value.const_value.numpy(), param.detach().numpy()
        if node.op_type == "MatMul":  # a Linear's weight, stored transposed as MatMul's B
            expected, suffix = expected.T, ".T"
        else:
            suffix = ""
        if array.shape == expected.shape and np.array_equal(array, expected):
            renames[name] = f"{module}.weight{suffix}"
    taken = set(model.graph.initializers)
    for old, new in renames.items():
        if new not in taken:
            model.graph.initializers[old].name = new
            taken.add(new)
    for node in model.graph:
        node.metadata_props.clear()
