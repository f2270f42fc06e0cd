"""The reference backend: transformers' SmolVLMForConditionalGeneration in fp32, greedy, on the CPU.

Every fidelity check compares an exported artifact against this. It is a plain decode loop over the model's own
forward (vision encoder -> prompt prefill -> one token at a time with the KV cache), so each stage can be timed
and each step's logits kept; tests check it yields exactly the tokens of transformers' generate().
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pocketvlm.prompt import Processor, Request

from .base import Backend, Step, TextStream, next_input


class ReferenceBackend(Backend):
    name = "reference"
    quant = "fp32"

    def __init__(self, path: Path, threads: int | None = None):
        import torch
        from transformers import SmolVLMForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our CLI owns the terminal
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.processor = Processor(self.path)
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

    def generate(self, request: Request, max_tokens: int, *, ignore_eos: bool = False,
                 with_logits: bool = False, force: Sequence[int] | None = None) -> Iterator[Step]:
        import torch

        enc = self.processor.encode(request)
        context = self.processor.config.context_length
        stream = TextStream(self.processor)
        with torch.inference_mode():
            start = time.perf_counter()
            vision = None
            if enc.pixel_values is not None:
                vision = self.model.get_image_features(
                    pixel_values=torch.from_numpy(enc.pixel_values),
                    pixel_attention_mask=torch.from_numpy(enc.pixel_attention_mask), return_dict=True)
            encoded = time.perf_counter()
            input_ids = torch.from_numpy(enc.input_ids)[None]
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             mm_encoder_outputs={"image": vision} if vision is not None else None,
                             use_cache=True, logits_to_keep=1)
            prefilled = time.perf_counter()
            position = input_ids.shape[1]
            for n in range(1, (len(force) if force is not None else max_tokens) + 1):
                logits = out.logits[0, -1]
                token = int(torch.argmax(logits))
                first = n == 1
                yield Step(token_id=token, text=stream.push(token), time=time.perf_counter(),
                           logits=logits.float().numpy().copy() if with_logits else None,
                           encode_s=(encoded - start) if first and vision is not None else None,
                           prefill_s=(prefilled - encoded) if first else None,
                           prompt_tokens=len(enc.input_ids) if first else None)
                fed = next_input(token, n, position, max_tokens=max_tokens, context=context,
                                 eos=self.processor.eos_token_ids, ignore_eos=ignore_eos, force=force)
                if fed is None:
                    return
                position += 1
                step_ids = torch.tensor([[fed]])
                out = self.model(input_ids=step_ids, attention_mask=torch.ones(1, position, dtype=torch.long),
                                 past_key_values=out.past_key_values, use_cache=True)
