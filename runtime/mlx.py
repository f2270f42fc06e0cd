"""MLX backend: an mlx-vlm model folder, driven token by token. Does not import torch.

The model is mlx-vlm's own SmolVLM (Idefics3 layout); the prompt and pixels come from pocketvlm.prompt, so the
tokens are the reference's by construction. The loop is the shared one (runtime/base.py) rather than mlx-vlm's
stream_generate, so each step's logits are available and teacher forcing works (and because stream_generate's
final result repeats its last token); this backend keeps MLX's asynchronous look-ahead as its lookahead() step.
On Linux, MLX runs on its CPU backend with the reference BLAS bundled in the mlx-cpu wheel: timings there are far
from what Apple Silicon gives, and describe() says so.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from pocketvlm.errors import ArtifactError, one_line
from pocketvlm.manifest import read_manifest
from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled, real_tiles, tile_batches

LINUX_NOTE = ("MLX on Linux runs on its CPU backend with the reference BLAS of the mlx-cpu wheel (fp32 matmul "
              "~2 GFLOP/s on 2 cores; preloading OpenBLAS, e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/"
              "libopenblas.so.0, gives ~45x more), and its quantized matmuls emulate half precision (10x slower "
              "than float32 on bfloat16 activations, 35x on float16): these timings are not what Apple Silicon "
              "users see")


def vision_weights(manifest: dict, quant: str) -> str:
    """What the vision tower's weights are, as the manifest records it (quantize/mlx.py vision_summary); artifacts
    made before that said only "quantized"."""
    q = manifest.get("quantization") or {}
    vision = q.get("vision")
    if vision == "quantized":
        return f"{q.get('bits')}bit g{q.get('group_size')}"
    return vision if isinstance(vision, str) else quant


class MLXBackend(Backend):
    name = "mlx"
    vision_batch = 1  # unmeasured at 500M (mlx-cpu is ~100x too slow); ONNX's measured choice, docs/BENCH.md

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None,
                 adapter: Path | None = None):
        import mlx.core as mx
        from mlx_vlm.utils import load_model

        self.path = Path(path)
        manifest = read_manifest(self.path) or {}
        self.quant = manifest.get("quant", "unknown")
        self.vision_weights = vision_weights(manifest, self.quant)
        self.processor = Processor(self.path, image_size=image_size)
        start = time.perf_counter()
        try:
            self.model = load_model(self.path)
            if adapter is not None:  # mlx-vlm's own loader: LoRA layers wrapped around the (quantized) base
                from mlx_vlm.trainer.peft.utils import apply_lora_layers

                self.model = apply_lora_layers(self.model, Path(adapter))
                self.model.eval()
            mx.eval(self.model.parameters())
        except Exception as e:  # mlx-vlm raises ValueError/RuntimeError/OSError/KeyError for broken folders
            raise ArtifactError(f"{self.path}: mlx-vlm cannot load this folder ({e.__class__.__name__}: "
                                f"{one_line(e, 200)}); re-export it") from e
        self.adapter = Path(adapter) if adapter is not None else None
        self.load_s = time.perf_counter() - start

    def describe(self) -> dict:
        import mlx.core as mx
        import mlx_vlm

        from mlx.utils import tree_flatten

        # what one decode step reads: the language model's weights (packed, with scales) but the embedding table
        read = sum(v.nbytes for k, v in tree_flatten(self.model.language_model.parameters())
                   if not k.startswith("embed_tokens"))
        info = {**super().describe(), "engine": f"mlx-vlm {mlx_vlm.__version__}", "mlx": mx.__version__,
                "device": str(mx.default_device()), "decode_weight_bytes": int(read)}
        if self.adapter:
            info["adapter"] = str(self.adapter)
        if platform.system() == "Linux":
            info["note"] = LINUX_NOTE
        return info

    def peak_memory_bytes(self) -> int | None:
        import mlx.core as mx

        return int(mx.get_peak_memory())

    # ------------------------------------------------------------------------------------------- decoding
    # A logits handle here is the step's logits with their greedy token and its probability, all still lazy on the
    # device; pick() reads them, lookahead() feeds the device-side token before Python has seen it.

    def _handle(self, logits):
        import mlx.core as mx

        token = mx.argmax(logits)
        prob = mx.exp(logits[token].astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32)))
        return logits, token, prob

    def _vision(self, enc: Encoded):
        """mlx-vlm's vision tower + connector on vision_batch tiles at a time, as its get_input_embeddings computes
        them (patch mask from the pixel mask, NHWC pixels, features cast to the pixels' dtype before the
        connector) -> [tiles, image_seq_len, hidden], still on the device."""
        import mlx.core as mx

        tiles, masks = real_tiles(enc.pixel_values, enc.pixel_attention_mask)
        patch = self.model.config.vision_config.patch_size
        parts = []
        for batch in tile_batches(len(tiles), self.vision_batch):
            pixels, mask = mx.array(tiles[batch]), masks[batch]
            n, h, w = mask.shape
            ph, pw = h // patch, w // patch
            patch_mask = mx.array(mask[:, :ph * patch, :pw * patch].reshape(n, ph, patch, pw, patch)
                                  .any(axis=(2, 4)))
            hidden, *_ = self.model.vision_model(pixels.transpose(0, 2, 3, 1), patch_attention_mask=patch_mask,
                                                 output_hidden_states=True)
            features = self.model.connector(hidden.astype(pixels.dtype))
            mx.eval(features)  # this batch's activations are freed before the next batch
            parts.append(features)
        return mx.concatenate(parts)

    def image_features(self, enc: Encoded) -> np.ndarray:
        import mlx.core as mx

        return np.array(self._vision(enc).astype(mx.float32))

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        import mlx.core as mx
        from mlx_vlm.models.cache import make_prompt_cache

        language = self.model.language_model
        ids = mx.array(enc.input_ids)[None]
        start = time.perf_counter()
        if enc.pixel_values is not None:
            features = mx.array(self.image_features(enc))  # float32 either way: the connector's output dtype
            # mlx-vlm's own merge (its masked scatter at the <image> positions) of exactly those features
            embeds = self.model.get_input_embeddings(
                ids, mx.array(enc.pixel_values), pixel_attention_mask=mx.array(enc.pixel_attention_mask),
                cached_image_features=features.reshape(-1, features.shape[-1])).inputs_embeds
        else:
            embeds = language.embed_tokens(ids)
        mx.eval(embeds)
        encoded = time.perf_counter()
        cache = make_prompt_cache(language)
        handle = self._handle(language(ids, inputs_embeds=embeds, cache=cache).logits[0, -1])
        mx.eval(handle)
        return Prefilled(handle, (encoded - start) if enc.pixel_values is not None else None, cache)

    def decode(self, cache, token_id: int, position: int):
        import mlx.core as mx

        handle = self._handle(self.model.language_model(mx.array([[token_id]]), cache=cache).logits[0, -1])
        mx.eval(handle)
        return handle

    def lookahead(self, cache, handle, position: int):
        # Free-running greedy decoding computes step n+1 while Python handles step n (as mlx-lm does): the next
        # input is the argmax itself, still on the device. At the end of sequence that one extra step is wasted,
        # which costs less than a sync per token.
        import mlx.core as mx

        ahead = self._handle(self.model.language_model(handle[1].reshape(1, 1), cache=cache).logits[0, -1])
        mx.async_eval(ahead)
        return ahead

    def pick(self, handle, with_logits: bool):
        import mlx.core as mx

        logits, token, prob = handle
        return int(token.item()), float(prob.item()), (np.array(logits.astype(mx.float32)) if with_logits else None)
