"""`pocketvlm finetune`: teach a SmolVLM2 model new image questions with LoRA (Hugging Face peft), on the CPU.

    pocketvlm finetune BASE --data DATA --out OUT

BASE is a Hugging Face SmolVLM2 folder or a Hub id in the cache; DATA a JSONL file (or a folder holding data.jsonl),
one {"image" | "images", "question", "answer"} per line, image paths relative to the file. Every row is checked
first (the JSON, the keys, every image through pocketvlm.media, the prompt it makes), so a bad row stops the run
before any training, in one line naming it. The model sees exactly the prompt every backend gives it
(pocketvlm.prompt) and only the answer is supervised, as in pocketvlm.train.

OUT is an ordinary Hugging Face SmolVLM2 folder with the LoRA merged into the weights (so export, check, ask and
serve take it unchanged), the adapter itself in peft's own format under OUT/adapter/, and a manifest recording the
base, the data, the recipe, the training time and held-out accuracy before and after. Recipe defaults and what each
--target adapts are data: pocketvlm/data/finetune.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import interrupts
from .errors import PocketVLMError, one_line
from .paths import path_arg, user_path

HELP = "teach a model new image questions with LoRA (peft) on your own pictures"
DESCRIPTION = ("Fine-tune BASE (a Hugging Face SmolVLM2 folder or a Hub id in the cache) on DATA with LoRA, on the "
               "CPU, and write OUT: the merged model as a normal Hugging Face folder (export, check, ask and serve "
               "take it unchanged), the adapter in peft's format in OUT/adapter/, and a manifest with held-out "
               "accuracy before and after. DATA is a JSONL file, or a folder holding data.jsonl, with one "
               '{"image": "pic.png", "question": "...", "answer": "..."} per line ("images": [...] for several; '
               "paths relative to the file). Every row is checked before training starts.")
DATA_FILE = "data.jsonl"
ROW_KEYS = ("image", "images", "question", "answer", "task")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@lru_cache(maxsize=None)
def recipes() -> dict:
    return json.loads(resources.files("pocketvlm").joinpath("data/finetune.json").read_text())


# ------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = recipes()["defaults"]
    targets = {k: v for k, v in recipes()["targets"].items() if not k.startswith("_")}
    parser.add_argument("base", type=path_arg,
                        metavar="BASE", help="Hugging Face SmolVLM2 folder or Hub id (in the cache)")
    parser.add_argument("--data", type=path_arg, required=True, metavar="DATA",
                        help=f"JSONL file, or a folder holding {DATA_FILE}: one image/question/answer per line")
    parser.add_argument("--out", type=path_arg, required=True, metavar="OUT",
                        help="output folder (refused if not empty, unless --force)")
    parser.add_argument("--rank", type=int, default=d["rank"], help=f"LoRA rank (default {d['rank']})")
    parser.add_argument("--alpha", type=float, default=d["alpha"],
                        help=f"LoRA alpha; the update is scaled by alpha/rank (default {d['alpha']:g})")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the training rows (default {d['epochs']})")
    length.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="train exactly N optimizer steps instead of whole epochs")
    parser.add_argument("--lr", type=float, default=d["lr"],
                        help=f"peak learning rate, warm-up then cosine decay (default {d['lr']:g})")
    parser.add_argument("--batch", type=int, default=d["batch"], help=f"rows per step (default {d['batch']})")
    parser.add_argument("--target", choices=sorted(targets), default=d["target"],
                        help="what LoRA adapts: " + "; ".join(f"{k}: {v['about']}" for k, v in targets.items())
                             + f" (default {d['target']})")
    parser.add_argument("--eval-split", type=float, default=d["eval_split"], metavar="FRACTION",
                        help=f"fraction of DATA held out to measure accuracy before and after (default "
                             f"{d['eval_split']:g}; 0: none)")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help=f"seed for the split, the order and LoRA's init (default {d['seed']})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT, if it is an earlier pocketvlm output, once the new one is complete")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def main(args) -> int:
    report = finetune(args.base, args.data, args.out, rank=args.rank, alpha=args.alpha, epochs=args.epochs,
                      max_steps=args.max_steps, lr=args.lr, batch=args.batch, target=args.target,
                      eval_split=args.eval_split, seed=args.seed, threads=args.threads, force=args.force,
                      progress=not args.quiet)
    print(f"wrote {args.out} ({summary_line(report)})", file=sys.stderr)
    return 0


def summary_line(record: dict) -> str:
    parts = [f"{record['train']['steps']} steps in {record['train']['train_s']:.0f}s"]
    for name, result in record["eval"].items():
        parts.append(f"{name} {result['before']['accuracy']:.1%} -> {result['after']['accuracy']:.1%}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Row:
    """One validated row: where it came from, its images, and its tokens (prompt + answer + end of answer)."""

    where: str               # "data.jsonl:17", for messages
    images: list[Path]
    question: str
    answer: str
    task: str | None
    ids: list[int] = field(default_factory=list)
    n_prompt: int = 0


def data_file(data) -> Path:
    path = user_path(data)
    if path.is_dir():
        path = path / DATA_FILE
        if not path.is_file():
            raise PocketVLMError(f"{data}: a folder without {DATA_FILE}; --data is a JSONL file or a folder "
                                 f"holding {DATA_FILE}")
    elif not path.is_file():
        raise PocketVLMError(f"{data}: no such file or folder")
    return path


def parse_rows(path: Path) -> list[Row]:
    """Every row of a JSONL file, checked for shape (not yet for images); one line naming the first bad row."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PocketVLMError(f"{path}: not UTF-8 text; DATA is JSON lines") from None
    except OSError as e:
        raise PocketVLMError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry nothing
        where = f"{path.name}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PocketVLMError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise PocketVLMError(f"{where}: nested too deeply to read; a row is one flat JSON object") from None
        except ValueError as e:  # e.g. an integer of thousands of digits (Python's int-from-text limit)
            raise PocketVLMError(f"{where}: unreadable JSON ({one_line(e, 80)})") from None
        rows.append(_row(item, where, path.parent))
    if not rows:
        raise PocketVLMError(f"{path}: no rows; DATA has one JSON object per line")
    return rows


def _row(item, where: str, folder: Path) -> Row:
    if not isinstance(item, dict):
        raise PocketVLMError(f"{where}: expected a JSON object, got {type(item).__name__}")
    unknown = [k for k in item if k not in ROW_KEYS]
    if unknown:
        # a typo of an optional key would otherwise be dropped without a word
        raise PocketVLMError(f"{where}: unknown key {unknown[0]!r}; a row has 'image' (or 'images'), 'question', "
                             f"'answer', and optionally 'task'")
    if "image" in item and "images" in item:
        raise PocketVLMError(f"{where}: both 'image' and 'images'; give one")
    if "image" in item:
        images = [item["image"]]
        if not isinstance(item["image"], str) or not item["image"].strip():
            raise PocketVLMError(f"{where}: 'image' must be a file path (a non-empty string)")
    elif "images" in item:
        images = item["images"]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p.strip() for p in images):
            raise PocketVLMError(f"{where}: 'images' must be a non-empty list of file paths")
    else:
        raise PocketVLMError(f"{where}: no image; give 'image': \"pic.png\" (or 'images': [...]), relative to "
                             f"the file")
    for key in ("question", "answer"):
        if key not in item:
            raise PocketVLMError(f"{where}: no {key!r}")
        if not isinstance(item[key], str):
            raise PocketVLMError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
        if not item[key].strip():
            raise PocketVLMError(f"{where}: empty {key!r}")
    task = item.get("task")
    if task is not None and not isinstance(task, str):
        raise PocketVLMError(f"{where}: 'task' must be a string, got {type(task).__name__}")
    return Row(where, [folder / user_path(p) for p in images], item["question"], item["answer"].strip(), task)


def check_rows(rows: list[Row], processor, progress: bool = False) -> None:
    """Open every image (pocketvlm.media, as ask does) and tokenize every prompt and answer, before training."""
    from tqdm import tqdm

    from .media import open_image
    from .prompt import Request

    eos = _end_of_answer(processor)
    for row in tqdm(rows, desc="checking data", disable=not progress, leave=False):
        try:
            images = [open_image(p) for p in row.images]
            for token in processor.special_tokens:
                if token in row.answer:
                    raise PocketVLMError(f"the answer contains the reserved token {token!r}")
            enc = processor.encode(Request(row.question, images=images))
        except PocketVLMError as e:
            raise PocketVLMError(f"{row.where}: {e}") from None
        answer = processor.tokenizer.encode(" " + row.answer, add_special_tokens=False).ids + [eos]
        row.ids, row.n_prompt = enc.input_ids.tolist() + answer, len(enc.input_ids)
        if len(row.ids) > processor.config.context_length:
            raise PocketVLMError(f"{row.where}: prompt and answer are {len(row.ids)} tokens, the model's context "
                                 f"is {processor.config.context_length}; shorten the answer or use smaller images")


def _end_of_answer(processor) -> int:
    eos = processor.eos_token_ids
    preferred = processor.tokenizer.token_to_id("<end_of_utterance>")
    return preferred if preferred in eos else min(eos)


def split_rows(rows: list[Row], eval_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded split: (train, eval). Any eval split above 0 keeps at least one row; training keeps at least one."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_split)) if eval_split > 0 else 0
    if len(rows) - n_eval < 1:
        raise PocketVLMError(f"DATA has {len(rows)} row(s): too few to hold {n_eval} out for evaluation and train "
                             f"on the rest; add rows or pass --eval-split 0")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def data_sha256(path: Path, rows: list[Row]) -> str:
    """The JSONL's bytes and every image's, in order: the same hash means the same training data."""
    from .manifest import sha256_file

    digest = hashlib.sha256(Path(path).read_bytes())
    for image in dict.fromkeys(p for r in rows for p in r.images):
        digest.update(sha256_file(image).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- output

def check_out(out: Path, *, protected: list[Path], force: bool) -> None:
    """OUT may be new, empty, or (with --force) an earlier pocketvlm output; never the base, the data, a folder
    holding either or inside them, or the working directory (the rule every output follows)."""
    from .manifest import check_output

    check_output(user_path(out), force=force, protect=tuple(protected))


def _max_rank(config: dict, target: str) -> int:
    """The width of the narrowest layer TARGET adapts (the largest useful LoRA rank), from the model's config."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    hidden = int(text.get("hidden_size") or 1)
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or hidden // heads)
    widths = {"text": [hidden, int(text.get("num_key_value_heads") or heads) * head_dim],
              "vision": [int(vision.get("hidden_size") or 1), hidden]}  # the connector projects into the text width
    widths["both"] = widths["text"] + widths["vision"]
    return max(1, min(widths.get(target, widths["both"])))


def _weights_dtype(config: dict) -> str:
    """The dtype the base keeps its weights in: OUT keeps the same, so it is as large as the base."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise PocketVLMError(f"the base's weights are {dtype}; finetune takes float32, float16 or bfloat16 models")
    return dtype


def _copy_model_files(base: Path, scratch: Path) -> None:
    """Everything of the base but its weights and manifest: config, tokenizer, templates, processor files."""
    import shutil

    for path in sorted(base.iterdir()):
        if path.is_file() and path.name not in WEIGHT_FILES and path.name != "pocketvlm.json" \
                and not path.name.endswith((".safetensors", ".bin")) and path.name != "README.md":
            shutil.copy2(path, scratch / path.name)  # follows the Hub cache's symlinks


# ------------------------------------------------------------------------------------------- evaluation

def known_heldout(origin: str | None) -> Path | None:
    """The held-out questions shipped for a base of this origin (e.g. the micro model's), if any."""
    name = recipes()["known_heldout"].get(origin or "")
    return Path(str(resources.files("pocketvlm.samples").joinpath(name))) if name else None


def base_origin(base: Path) -> str | None:
    """Where the base came from, through any earlier fine-tunes: 'preset:micro', a Hub id, or None."""
    from .manifest import read_manifest

    manifest = read_manifest(base) or {}
    if "finetune" in manifest:
        return manifest["finetune"]["base"].get("origin")
    source_id = (manifest.get("source") or {}).get("id")
    return source_id if source_id and source_id.startswith("preset:") else None


def grade(backend, samples, max_tokens: int, desc: str, progress: bool) -> dict:
    """Exact-answer accuracy (pocketvlm's grading: the answer up to end-of-answer, normalized), overall and per
    task."""
    from tqdm import tqdm

    from .evaluate import is_correct

    per_task: dict[str, list[bool]] = {}
    for request, expected, task in tqdm(samples, desc=desc, disable=not progress, leave=False):
        answer = backend.run(request, max_tokens).answer
        per_task.setdefault(task or "all", []).append(is_correct(answer, expected))
    flat = [ok for oks in per_task.values() for ok in oks]
    result = {"accuracy": sum(flat) / len(flat), "n": len(flat)}
    if set(per_task) != {"all"}:
        result["per_task"] = {t: sum(oks) / len(oks) for t, oks in sorted(per_task.items())}
    return result


def _row_samples(rows: list[Row]):
    from .media import open_image
    from .prompt import Request

    for row in rows:  # opened when asked, so a large eval split is never all in memory at once
        yield Request(row.question, images=[open_image(p) for p in row.images]), row.answer, row.task


class _Sized:
    """A lazily built list with a length, for the progress bar."""

    def __init__(self, n, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.make())


def _heldout_samples(path: Path):
    from .evaluate import load_samples

    items = json.loads(path.read_text())
    tasks = [item.get("task") for item in items]
    return [(s.request, s.answer, t) for s, t in zip(load_samples(path), tasks)]


def _answer_budget(processor, answers) -> int:
    """Tokens enough for the longest expected answer and its end: a longer answer cannot grade as right."""
    return max(len(processor.tokenizer.encode(" " + a, add_special_tokens=False).ids) for a in answers) + 4


def evaluate(folder: Path, suites: dict, progress: bool, label: str) -> dict:
    from pocketvlm.runtime.reference import ReferenceBackend

    backend = ReferenceBackend(folder)
    return {name: grade(backend, samples, budget, f"{label}: {name}", progress)
            for name, (samples, budget) in suites.items()}


# --------------------------------------------------------------------------------------------- training

def lora_model(model, *, rank: int, alpha: float, target: str, dropout: float = 0.0):
    """The model wrapped by peft with LoRA on the --target modules (all else frozen)."""
    from peft import LoraConfig, get_peft_model

    import warnings

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=recipes()["targets"][target]["modules"])
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; the user can do nothing about it
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def batch_inputs(processor, rows: list[Row], pad_id: int) -> dict:
    """Model inputs for rows: padded ids, labels only on the answer, and every row's tiles padded to the batch's
    largest count with all-zero tiles (SmolVLM drops those)."""
    import numpy as np
    import torch

    from .media import open_image
    from .prompt import Request

    longest = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    tiles = []
    for i, row in enumerate(rows):
        n = len(row.ids)
        ids[i, :n] = torch.tensor(row.ids)
        labels[i, row.n_prompt:n] = torch.tensor(row.ids[row.n_prompt:])
        mask[i, :n] = 1
        enc = processor.encode(Request(row.question, images=[open_image(p) for p in row.images]))
        tiles.append((enc.pixel_values[0], enc.pixel_attention_mask[0]))
    n_tiles = max(t.shape[0] for t, _ in tiles)
    h = max(t.shape[2] for t, _ in tiles)
    w = max(t.shape[3] for t, _ in tiles)
    pixels = np.zeros((len(rows), n_tiles, 3, h, w), dtype=np.float32)
    pixel_mask = np.zeros((len(rows), n_tiles, h, w), dtype=bool)
    for i, (t, m) in enumerate(tiles):
        pixels[i, :t.shape[0], :, :t.shape[2], :t.shape[3]] = t
        pixel_mask[i, :m.shape[0], :m.shape[1], :m.shape[2]] = m
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.from_numpy(pixels),
            "pixel_attention_mask": torch.from_numpy(pixel_mask)}


def optimizer_and_schedule(model, *, lr: float, steps: int, warmup_fraction: float, weight_decay: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(steps * warmup_fraction))

    def factor(step):  # linear warm-up, cosine decay to a tenth (as pocketvlm.train)
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_steps(model, processor, rows: list[Row], *, steps: int, batch: int, lr: float, seed: int,
                progress: bool) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    d = recipes()["defaults"]
    opt, schedule = optimizer_and_schedule(model, lr=lr, steps=steps, warmup_fraction=d["warmup_fraction"],
                                           weight_decay=d["weight_decay"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    pad_id = processor.tokenizer.token_to_id("<|im_end|>") or 0  # masked out: any id does
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(rows), generator=generator).tolist(), 0
    losses = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress, leave=False)
    for _ in bar:
        interrupts.check()  # a Ctrl-C a finaliser swallowed (pocketvlm.interrupts)
        picked = []
        while len(picked) < batch:  # epochs run into each other: the last partial batch is topped up
            if cursor == len(order):
                order, cursor = torch.randperm(len(rows), generator=generator).tolist(), 0
            take = order[cursor:cursor + batch - len(picked)]
            picked += take
            cursor += len(take)
        loss = model(**batch_inputs(processor, [rows[i] for i in picked], pad_id)).loss
        if not math.isfinite(loss.item()):
            raise PocketVLMError(f"training diverged at step {len(losses) + 1} of {steps} (the loss is "
                                 f"{loss.item()}, after {len(losses)} finite steps at --lr {lr:g}); nothing was "
                                 f"written: lower --lr (default {d['lr']:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, d["max_grad_norm"])
        if not math.isfinite(norm.item()):
            raise PocketVLMError(f"training diverged at step {len(losses) + 1} of {steps} (a gradient is not "
                                 f"finite at --lr {lr:g}); nothing was written: lower --lr (default {d['lr']:g})")
        opt.step()
        schedule.step()
        if not all(torch.isfinite(p).all() for p in trainable):
            raise PocketVLMError(f"training diverged at step {len(losses) + 1} of {steps} (the weights are no longer "
                                 f"finite at --lr {lr:g}); nothing was written: lower --lr (default {d['lr']:g})")
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    every = max(1, steps // 20)
    return {"steps": steps, "train_s": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
            "final_loss": float(np.mean(losses[-10:])),
            "loss_curve": [round(float(np.mean(losses[i:i + every])), 4) for i in range(0, steps, every)]}


# ------------------------------------------------------------------------------------------------ main

MAX_STEPS = 1_000_000  # far beyond any CPU fine-tune (the defaults take tens to hundreds); bounds the loss records


def _check_flags(*, rank, alpha, epochs, max_steps, lr, batch, target, eval_split, threads, seed) -> None:
    from .threads import check_threads

    if rank < 1:
        raise PocketVLMError(f"--rank must be at least 1 (got {rank})")
    if not 0 <= seed < 2 ** 63:
        raise PocketVLMError(f"--seed must be from 0 to 2**63-1 (got {seed})")
    if epochs is not None and epochs > MAX_STEPS or max_steps is not None and max_steps > MAX_STEPS:
        raise PocketVLMError(f"--epochs / --max-steps: at most {MAX_STEPS:,} (got "
                             f"{epochs if epochs is not None else max_steps:,})")
    if threads is not None:
        check_threads(threads)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise PocketVLMError(f"--alpha must be a positive number (got {alpha:g})")
    if epochs is not None and epochs < 1:
        raise PocketVLMError(f"--epochs must be at least 1 (got {epochs})")
    if max_steps is not None and max_steps < 1:
        raise PocketVLMError(f"--max-steps must be at least 1 (got {max_steps})")
    if not (lr > 0 and math.isfinite(lr)):
        raise PocketVLMError(f"--lr must be a positive number (got {lr:g})")
    if batch < 1:
        raise PocketVLMError(f"--batch must be at least 1 (got {batch})")
    if target not in recipes()["targets"] or target.startswith("_"):
        raise PocketVLMError(f"unknown --target {target!r}; choose text, vision or both")
    if not (0 <= eval_split < 1):
        raise PocketVLMError(f"--eval-split is a fraction of DATA, from 0 (none) up to 1 (got {eval_split:g})")


def _tool_versions() -> dict:
    import peft
    import tokenizers
    import torch
    import transformers

    from . import __version__

    return {"pocketvlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "peft": peft.__version__}


def finetune(base: str, data, out, *, rank: int | None = None, alpha: float | None = None,
             epochs: int | None = None, max_steps: int | None = None, lr: float | None = None,
             batch: int | None = None, target: str | None = None, eval_split: float | None = None,
             seed: int | None = None, threads: int | None = None, force: bool = False,
             progress: bool = True) -> dict:
    """Fine-tune BASE on DATA with LoRA and write OUT (see the module doc). Returns the manifest's finetune
    record. Everything a user can get wrong is checked before the model is loaded."""
    from .manifest import atomic_output, write_manifest
    from .jsonfile import read_json
    from .models import resolve_source
    from .prompt import Processor

    d = recipes()["defaults"]
    rank = d["rank"] if rank is None else rank
    alpha = d["alpha"] if alpha is None else alpha
    lr = d["lr"] if lr is None else lr
    batch = d["batch"] if batch is None else batch
    target = d["target"] if target is None else target
    eval_split = d["eval_split"] if eval_split is None else eval_split
    seed = d["seed"] if seed is None else seed
    _check_flags(rank=rank, alpha=alpha, epochs=epochs, max_steps=max_steps, lr=lr, batch=batch, target=target,
                 eval_split=eval_split, threads=threads, seed=seed)
    if epochs is not None and max_steps is not None:
        raise PocketVLMError("pass --epochs or --max-steps, not both")
    import importlib.util

    if importlib.util.find_spec("peft") is None:  # found without importing it (peft imports torch: seconds)
        raise PocketVLMError("finetune needs peft, which is not installed: pip install 'pocketvlm[finetune]'")

    source = resolve_source(str(base))
    jsonl = data_file(data)
    rows = parse_rows(jsonl)
    # every input is protected like the base: the data, its folder when given as one, and every image a row names
    # (images may live anywhere, even inside an earlier OUT that --force would replace)
    protected = [source.path, jsonl.resolve().parent if Path(data).is_dir() else jsonl,
                 *dict.fromkeys(p for r in rows for p in r.images)]
    check_out(Path(out), protected=protected, force=force)
    processor = Processor(source.path)
    train_rows, eval_rows = split_rows(rows, eval_split, seed)
    check_rows(rows, processor, progress)
    config = read_json(source.path / "config.json", "not a SmolVLM model folder")
    dtype = _weights_dtype(config)
    most = _max_rank(config, target)
    if rank > most:
        raise PocketVLMError(f"--rank {rank} is larger than the narrowest layer --target {target} adapts ({most} "
                             f"wide): a LoRA update of rank r needs r <= that width; give --rank {most} or less")
    if batch > len(train_rows):  # a step cannot hold more distinct rows than there are: cap it, and say so
        if progress:
            print(f"pocketvlm: --batch {batch} is more than the {len(train_rows)} training rows; using "
                  f"{len(train_rows)}", file=sys.stderr)
        batch = len(train_rows)
    epochs = d["epochs"] if epochs is None and max_steps is None else epochs
    steps = max_steps or epochs * math.ceil(len(train_rows) / batch)
    if steps > MAX_STEPS:
        raise PocketVLMError(f"{epochs:,} epochs of {math.ceil(len(train_rows) / batch)} steps is more than "
                             f"{MAX_STEPS:,} steps; fewer --epochs")

    suites = {}
    if eval_rows:
        suites["eval_split"] = (_Sized(len(eval_rows), lambda: _row_samples(eval_rows)),
                                _answer_budget(processor, [r.answer for r in eval_rows]))
    origin = base_origin(source.path) or (source.id if source.revision else None)
    heldout = known_heldout(origin)
    if heldout is not None:
        samples = _heldout_samples(heldout)
        suites["base_heldout"] = (samples, _answer_budget(processor, [a for _, a, _ in samples]))
    if progress:
        print(f"pocketvlm: finetune {base}: {len(train_rows)} rows to train on, {len(eval_rows)} held out; "
              f"{steps} steps of {batch}, LoRA rank {rank} on {target}", file=sys.stderr, flush=True)

    import torch
    from transformers import SmolVLMForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from pocketvlm.artifact import source_record

    hf_logging.disable_progress_bar()  # our bars own the terminal
    if threads:
        torch.set_num_threads(threads)
    before = evaluate(source.path, suites, progress, "before") if suites else {}
    with atomic_output(user_path(out), force=force, protect=tuple(protected)) as scratch:
        torch.manual_seed(seed)  # LoRA's A matrices are drawn from torch's global generator
        model = SmolVLMForConditionalGeneration.from_pretrained(source.path, dtype=torch.float32)
        model = lora_model(model, rank=rank, alpha=alpha, target=target, dropout=d["dropout"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record_train = train_steps(model, processor, train_rows, steps=steps, batch=batch, lr=lr, seed=seed,
                                   progress=progress)
        model.peft_config["default"].base_model_name_or_path = source.id if source.revision else str(source.path)
        # only the LoRA pairs: with lm_head targeted, peft would also save the head's own (unchanged) weight, which
        # llama.cpp's and mlx-vlm's adapter loaders do not take
        model.save_pretrained(scratch / "adapter", save_embedding_layers=False)
        merged = model.merge_and_unload().to(getattr(torch, dtype))
        merged.save_pretrained(scratch)
        _copy_model_files(source.path, scratch)  # the base's own config, tokenizer and processor files
        after = evaluate(scratch, suites, progress, "after") if suites else {}
        record = {
            "base": {**source_record(source), "origin": origin},
            "data": {"path": str(jsonl.resolve()), "sha256": data_sha256(jsonl, rows), "rows": len(rows),
                     "train": len(train_rows), "eval": len(eval_rows)},
            "recipe": {"rank": rank, "alpha": alpha, "dropout": d["dropout"], "target": target,
                       "target_modules": recipes()["targets"][target]["modules"], "lr": lr, "batch": batch,
                       "epochs": epochs, "max_steps": max_steps, "eval_split": eval_split, "seed": seed,
                       "warmup_fraction": d["warmup_fraction"], "weight_decay": d["weight_decay"],
                       "trainable_params": trainable},
            "train": record_train,
            "eval": {name: {"before": before[name], "after": after[name],
                            **({"samples": str(heldout)} if name == "base_heldout" else {})} for name in suites},
        }
        write_manifest(scratch, format="hf", quant={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype],
                       source={"id": source.id, "revision": source.revision, "path": str(source.path),
                               "sha256": record["base"]["sha256"]},
                       tools=_tool_versions(), finetune=record)
    return record
