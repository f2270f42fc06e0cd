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

from pocketvlm.errors import ArtifactError
from pocketvlm.manifest import read_manifest
from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled

LINUX_NOTE = ("MLX on Linux runs on its CPU backend with the reference BLAS of the mlx-cpu wheel (fp32 matmul "
              "~2 GFLOP/s on 2 cores; preloading OpenBLAS, e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/"
              "libopenblas.so.0, gives ~45x more), and its quantized matmuls emulate half precision (10x slower "
              "than float32 on bfloat16 activations, 35x on float16): these timings are not what Apple Silicon "
              "users see")


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None,
                 adapter: Path | None = None):
        import mlx.core as mx
        from mlx_vlm.utils import load_model

        self.path = Path(path)
        self.quant = (read_manifest(self.path) or {}).get("quant", "unknown")
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
            detail = " ".join(str(e).split())[:200] or e.__class__.__name__
            raise ArtifactError(f"{self.path}: mlx-vlm cannot load this folder ({e.__class__.__name__}: {detail}); "
                                f"re-export it") from e
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

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        import mlx.core as mx
        from mlx_vlm.models.cache import make_prompt_cache

        language = self.model.language_model
        ids = mx.array(enc.input_ids)[None]
        start = time.perf_counter()
        if enc.pixel_values is not None:
            embeds = self.model.get_input_embeddings(
                ids, mx.array(enc.pixel_values), pixel_attention_mask=mx.array(enc.pixel_attention_mask)
            ).inputs_embeds
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
