"""What a LoRA fine-tune costs on this CPU at the real SmolVLM2 shapes: seconds per optimizer step and peak RSS
(a benchmark, not a test; timings depend on the machine, so no test asserts them).

    python -m pocketvlm.bench_device.finetune_cost [--presets 256m,500m] [--ranks 8,16] [--batch 4] [--steps 4]
                                                   [--tiles 1] [--target text] [--threads N] [--models DIR]

Each (preset, rank) runs in a process of its own, so peak RSS (VmHWM) is that configuration's alone. The model is
a make-model folder with random weights at the published shape (built once under --models; speed and memory do
not depend on weight values), loaded in fp32 and wrapped with LoRA exactly as `pocketvlm finetune` wraps it; a
batch is --batch examples of --tiles 512-px tiles each (1: a picture at the tile size, or image splitting off; a
4:3 photo is 13 tiles after SmolVLM2's splitting), a short question and a one-word answer. The first --warmup
steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_batch(processor, batch: int, tiles: int, seed: int = 0) -> dict:
    """Model inputs for `batch` examples of `tiles` tiles: the prompt SmolVLM2's processor makes for such a
    picture (its tile grid + the global image), random pixels, the answer supervised as finetune does."""
    import numpy as np
    import torch
    from PIL import Image

    from pocketvlm.prompt import IMAGE, Request

    side = processor.config.max_image_size
    grid = {1: (0, 0), 5: (2, 2), 7: (2, 3), 13: (3, 4), 17: (4, 4)}
    if tiles not in grid:
        raise SystemExit(f"--tiles is one of {sorted(grid)} (a tile grid plus the global image)")
    rows, cols = grid[tiles]
    prompt = processor.render(Request("What is in the picture?", images=[Image.new("RGB", (side, side))]))
    prompt = prompt.replace(IMAGE, processor.image_prompt(rows, cols), 1)
    ids = processor.tokenizer.encode(prompt, add_special_tokens=True).ids
    answer = processor.tokenizer.encode(" A cat.", add_special_tokens=False).ids
    answer += [processor.tokenizer.token_to_id("<end_of_utterance>")]
    input_ids = torch.tensor([ids + answer] * batch)
    labels = torch.full_like(input_ids, -100)
    labels[:, len(ids):] = torch.tensor(answer)
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (batch, tiles, 3, side, side)).astype(np.float32))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values": pixels, "pixel_attention_mask": torch.ones(batch, tiles, side, side, dtype=torch.bool)}


def worker(spec: dict) -> dict:
    """One configuration, in this process: load, wrap, time the steps."""
    import torch
    from transformers import SmolVLMForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from pocketvlm.bench_device.worker import _peak_rss_bytes
    from pocketvlm.finetune import lora_model, optimizer_and_schedule, recipes
    from pocketvlm.prompt import Processor

    hf_logging.disable_progress_bar()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    processor = Processor(spec["model"])
    start = time.perf_counter()
    model = SmolVLMForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32)
    model = lora_model(model, rank=spec["rank"], alpha=2 * spec["rank"], target=spec["target"])
    load_s = time.perf_counter() - start
    rss_loaded = _peak_rss_bytes()
    total = spec["warmup"] + spec["steps"]
    d = recipes()["defaults"]
    opt, schedule = optimizer_and_schedule(model, lr=d["lr"], steps=total, warmup_fraction=d["warmup_fraction"],
                                           weight_decay=d["weight_decay"])
    inputs = one_batch(processor, spec["batch"], spec["tiles"])
    model.train()
    times = []
    for step in range(total):
        t = time.perf_counter()
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    return {**spec, "load_s": round(load_s, 1), "s_per_step": statistics.median(times),
            "s_per_step_all": [round(x, 2) for x in times], "tokens_per_example": int(inputs["input_ids"].shape[1]),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rss_loaded_bytes": rss_loaded, "peak_rss_bytes": _peak_rss_bytes(),
            "threads_used": torch.get_num_threads()}


def ensure_model(models: Path, preset: str) -> Path:
    from pocketvlm.manifest import read_manifest
    from pocketvlm.make_model import make_model

    folder = models / preset
    if not (folder.is_dir() and read_manifest(folder)):
        make_model(folder, preset, progress=False)
    return folder


def markdown(rows: list[dict], photos: int = 1000, epochs: int = 3) -> str:
    lines = [f"| shape | rank | target | batch x tiles | tokens/example | trainable | s/step | peak RSS | "
             f"{photos} examples x {epochs} epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = -(-photos // r["batch"]) * epochs
        hours = steps * r["s_per_step"] / 3600
        lines.append(f"| {r['preset']} | {r['rank']} | {r['target']} | {r['batch']} x {r['tiles']} | "
                     f"{r['tokens_per_example']} | {r['trainable_params'] / 1e6:.1f}M | {r['s_per_step']:.1f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {hours:.1f} h |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketvlm.bench_device.finetune_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="256m,500m", help="make-model presets (default 256m,500m)")
    parser.add_argument("--ranks", default="8,16", help="LoRA ranks (default 8,16)")
    parser.add_argument("--target", default="text", choices=["text", "vision", "both"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=1, help="512-px tiles per example: 1, 5, 7, 13 or 17")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median reported; default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", default=str(Path.home() / ".cache" / "pocketvlm" / "bench-models"),
                        help="where the random-weight model folders are built once")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    rows = []
    for preset in args.presets.split(","):
        model = ensure_model(Path(args.models), preset)
        for rank in (int(r) for r in args.ranks.split(",")):
            spec = {"preset": preset, "model": str(model), "rank": rank, "target": args.target,
                    "batch": args.batch, "tiles": args.tiles, "steps": args.steps, "warmup": args.warmup,
                    "threads": args.threads}
            proc = subprocess.run([sys.executable, "-m", "pocketvlm.bench_device.finetune_cost", "--worker",
                                   json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{preset} rank {rank}: {rows[-1]['s_per_step']:.1f} s/step, peak RSS "
                  f"{rows[-1]['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
