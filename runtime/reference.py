"""The reference backend: transformers' SmolVLMForConditionalGeneration in fp32, greedy, on the CPU.

Every fidelity check compares an exported artifact against this. Its steps are the model's own forward
(vision encoder -> prompt prefill -> one token at a time with the KV cache) driven by the shared loop in base.py,
so each stage can be timed and each step's logits kept; tests check it yields exactly the tokens and logits of
transformers' generate().
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pocketvlm.prompt import Encoded, Processor

from .base import Backend, Prefilled, real_tiles, tile_batches


class ReferenceBackend(Backend):
    name = "reference"
    quant = "fp32"
    vision_weights = "fp32"
    vision_batch = 4  # the same peak at 1, 4, 13 (the weights dominate), least CPU at 4; docs/BENCH.md

    def __init__(self, path: Path, threads: int | None = None, image_size: int | None = None):
        import torch
        from transformers import SmolVLMForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our CLI owns the terminal
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.processor = Processor(self.path, image_size=image_size)
        start = time.perf_counter()
        self.model = SmolVLMForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - start

    def describe(self) -> dict:
        import torch
        import transformers

        text = self.model.model.text_model
        # what one decode step reads: every text-model weight but the embedding table (one row), plus lm_head
        read = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
        read += self.model.lm_head.weight.numel() * self.model.lm_head.weight.element_size()
        return {**super().describe(), "engine": f"transformers {transformers.__version__}",
                "torch": torch.__version__, "threads": torch.get_num_threads(), "decode_weight_bytes": read}

    def _vision(self, enc: Encoded):
        """get_image_features on vision_batch tiles at a time -> torch float32 [tiles, image_seq_len, hidden]."""
        import torch

        tiles, masks = real_tiles(enc.pixel_values, enc.pixel_attention_mask)
        parts = []
        for batch in tile_batches(len(tiles), self.vision_batch):
            out = self.model.get_image_features(pixel_values=torch.from_numpy(tiles[batch][None]),
                                                pixel_attention_mask=torch.from_numpy(masks[batch][None]),
                                                return_dict=True)
            parts += [f.reshape(-1, self.processor.config.image_seq_len, f.shape[-1]) for f in out.pooler_output]
        return torch.cat(parts)

    def image_features(self, enc: Encoded) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._vision(enc).float().numpy()

    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        with torch.inference_mode():
            start = time.perf_counter()
            vision = None
            if enc.pixel_values is not None:
                features = torch.from_numpy(self.image_features(enc))
                # the model's own merge (masked_scatter at the <image> positions) of exactly those features
                vision = BaseModelOutputWithPooling(pooler_output=features.reshape(-1, features.shape[-1]))
            encoded = time.perf_counter()
            input_ids = torch.from_numpy(enc.input_ids)[None]
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             mm_encoder_outputs={"image": vision} if vision is not None else None,
                             use_cache=True, logits_to_keep=1)
        state = {"past": out.past_key_values}
        return Prefilled(out.logits[0, -1], (encoded - start) if vision is not None else None, state)

    def decode(self, state, token_id: int, position: int):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token_id]]),
                             attention_mask=torch.ones(1, position + 1, dtype=torch.long),
                             past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1]
