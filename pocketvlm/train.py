"""Train the micro preset on the synthetic image-QA set (pocketvlm.synthetic), deterministically, on the CPU.

The model is an ordinary SmolVLMForConditionalGeneration and the inputs come from pocketvlm.prompt, so it sees
exactly the prompt layout every backend will give it: `User:<image...>What color is the circle?<end_of_utterance>
\\nAssistant:` followed by the answer " red" and <end_of_utterance>. Only the answer is supervised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import interrupts
from .prompt import Processor, Request
from .synthetic import TRAIN_SEED, examples, task_cycle


@dataclass
class Encoded:
    ids: np.ndarray     # prompt + answer + <end_of_utterance>
    n_prompt: int
    pixels: np.ndarray  # [3, S, S] uint8: codes into pixel_levels(), a quarter of the float32 tile's memory
    levels: np.ndarray  # [3, 256] float32, shared: what the processor makes of each 8-bit value, per channel

    def pixel_values(self) -> np.ndarray:
        """The processor's float32 tile, exactly."""
        return np.stack([self.levels[c][self.pixels[c]] for c in range(len(self.levels))])


def pixel_levels(processor: Processor) -> np.ndarray:
    """[3, 256]: the processor's rescale + normalize of every 8-bit value, per channel (ascending)."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # a 256 x 1 picture, HWC
    return processor.normalize(ramp)[:, :, 0]


def encode_examples(processor: Processor, items, levels: np.ndarray | None = None) -> list[Encoded]:
    eos = next(iter(processor.eos_token_ids))
    levels = pixel_levels(processor) if levels is None else levels
    out = []
    for ex in items:
        enc = processor.encode(Request(ex.question, images=[ex.image]))
        if enc.pixel_values.shape[1] != 1:
            raise ValueError("micro training expects one tile per image (image size == tile size)")
        tile = enc.pixel_values[0, 0]
        codes = np.stack([np.searchsorted(levels[c], tile[c]) for c in range(len(levels))]).astype(np.uint8)
        answer = processor.tokenizer.encode(" " + ex.answer, add_special_tokens=False).ids + [eos]
        item = Encoded(np.concatenate([enc.input_ids, np.asarray(answer, dtype=np.int64)]), len(enc.input_ids),
                       codes, levels)
        if not np.array_equal(item.pixel_values(), tile):  # resized pictures are 8-bit, so this cannot happen
            raise ValueError("a training tile is not made of 8-bit levels; cannot store it compactly")
        out.append(item)
    return out


def _batch(items: list[Encoded], pad_id: int):
    import torch

    longest = max(len(e.ids) for e in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.ids)
        ids[i, :n] = torch.from_numpy(e.ids)
        labels[i, e.n_prompt:n] = torch.from_numpy(e.ids[e.n_prompt:])
        mask[i, :n] = 1
    pixels = torch.from_numpy(np.stack([e.pixel_values() for e in items]))[:, None]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(pixels.shape[0], 1, *pixels.shape[-2:], dtype=torch.bool)}


def train(model, model_dir: Path, cfg: dict, *, seed: int = 0, progress: bool = True) -> dict:
    """Train in place; returns the training record for the manifest."""
    import time

    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    processor = Processor(model_dir)
    data = encode_examples(processor, examples(cfg["examples"], TRAIN_SEED + seed, task_cycle(cfg.get("task_mix"))))
    pad = processor.tokenizer.token_to_id("<|im_end|>")
    steps, batch = cfg["steps"], cfg["batch"]
    # The vision tower learns from scratch through the connector and the language model, so its gradients arrive
    # weak: it gets a larger learning rate (vision_lr_mult).
    vision = [p for n, p in model.named_parameters() if ".vision_model." in f".{n}" or "connector" in n]
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": cfg["lr"]},
                             {"params": vision, "lr": cfg["lr"] * cfg.get("vision_lr_mult", 1.0)}],
                            betas=(0.9, 0.98), weight_decay=cfg["weight_decay"])

    def lr_at(step):  # linear warm-up, cosine decay to a tenth
        if step < cfg["warmup"]:
            return (step + 1) / cfg["warmup"]
        t = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    model.train()
    start, losses, cursor = time.perf_counter(), [], 0
    bar = tqdm(range(steps), desc="train micro", disable=not progress, leave=False)
    for _ in bar:
        interrupts.check()  # a Ctrl-C a finaliser swallowed (pocketvlm.interrupts)
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        inputs = _batch([data[i] for i in order[cursor:cursor + batch].tolist()], pad)
        cursor += batch
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    model.eval()
    return {"examples": cfg["examples"], "task_mix": cfg.get("task_mix"), "steps": steps, "batch": batch,
            "lr": cfg["lr"], "seed": seed, "final_loss": float(np.mean(losses[-50:])),
            "train_s": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
