"""A synthetic image-QA set, generated deterministically: colored shapes, counts, positions, a digit.

Every example is a 128x128 picture, a question and a one-word answer. The same seed gives the same pixels on any
machine (PIL's built-in font and integer drawing only), so the held-out split committed under samples/ can be
regenerated and compared.

    python -m pocketvlm.synthetic samples/heldout      # rewrite the committed held-out split
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 128
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "1", 2: "2", 3: "3", 4: "4"}
POSITIONS = ("left", "right", "top", "bottom")
TASKS = ("color", "count", "position", "number")  # what the micro model is trained on (and its held-out split)
# Tasks the micro model never saw: what `pocketvlm finetune`'s proof teaches it (its answers are words the model
# has only read in questions, never said).
NEW_TASKS = ("shape", "french")
# the "french" task: the colours the micro model knows, asked for in words it has never produced
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange"}
GRID = 4  # count task: shapes in distinct cells of a GRID x GRID layout
TRAIN_SEED, HELDOUT_SEED = 1, 2  # disjoint streams: the held-out pictures are never trained on


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    task: str


def _background(rng: random.Random) -> tuple[int, int, int]:
    g = rng.randint(225, 255)
    return (g, g - rng.randint(0, 10), g - rng.randint(0, 15))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, color) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _free_spots(rng: random.Random, n: int, r: int) -> list[tuple[int, int]]:
    """n centres whose shapes of radius r do not touch each other or the border."""
    spots = []
    while len(spots) < n:
        x, y = rng.randint(r + 4, SIZE - r - 4), rng.randint(r + 4, SIZE - r - 4)
        if all(abs(x - a) > 2 * r + 6 or abs(y - b) > 2 * r + 6 for a, b in spots):
            spots.append((x, y))
    return spots


def example(rng: random.Random, task: str) -> Example:
    img = Image.new("RGB", (SIZE, SIZE), _background(rng))
    d = ImageDraw.Draw(img)
    if task in ("color", "french"):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        (x, y), = _free_spots(rng, 1, 18)
        _draw_shape(d, shape, x, y, rng.randint(14, 22), COLORS[color])
        if task == "french":
            return Example(img, f"What color is the {shape}, in French?", FRENCH[color], task)
        return Example(img, f"What color is the {shape}?", color, task)
    if task == "count":
        # Shapes sit in distinct cells of a jittered 4x4 grid: the micro model sees a 128 px picture as 4x4 image
        # tokens, and a shape that straddles tokens has to be counted once across them, which a small vision tower
        # learns too slowly in a short CPU training (44% held-out with free placement).
        shape, n = rng.choice(SHAPES), rng.randint(1, 4)
        color = rng.choice(list(COLORS))
        cell = SIZE // GRID
        for c in rng.sample(range(GRID * GRID), n):
            x, y = cell * (c % GRID) + cell // 2, cell * (c // GRID) + cell // 2
            _draw_shape(d, shape, x + rng.randint(-3, 3), y + rng.randint(-3, 3), rng.randint(9, 11), COLORS[color])
        return Example(img, f"How many {shape}s are there?", COUNT_WORDS[n], task)
    if task == "position":
        shape, where = rng.choice(SHAPES), rng.choice(POSITIONS)
        r = rng.randint(12, 18)
        near, mid = rng.randint(r + 4, 40), SIZE // 2 + rng.randint(-12, 12)
        cx, cy = {"left": (near, mid), "right": (SIZE - near, mid), "top": (mid, near),
                  "bottom": (mid, SIZE - near)}[where]
        _draw_shape(d, shape, cx, cy, r, COLORS[rng.choice(list(COLORS))])
        return Example(img, f"Where is the {shape}?", where, task)
    if task == "number":
        digit = str(rng.randint(0, 9))
        font = ImageFont.load_default(size=rng.randint(68, 84))
        ink = rng.choice([(20, 20, 20), (40, 40, 120), (120, 30, 30)])
        d.text((SIZE // 2 + rng.randint(-10, 10), SIZE // 2 + rng.randint(-10, 10)), digit, fill=ink, font=font,
               anchor="mm")
        return Example(img, "What number is written?", digit, task)
    if task == "shape":
        shape, r = rng.choice(SHAPES), rng.randint(12, 24)
        (x, y), = _free_spots(rng, 1, r)
        _draw_shape(d, shape, x, y, r, COLORS[rng.choice(list(COLORS))])
        return Example(img, "What shape is it?", shape, task)
    raise ValueError(f"unknown task {task!r}")


def task_cycle(weights: dict[str, int] | None = None) -> tuple[str, ...]:
    """The order tasks come in: each task once per round (TASKS), or `weights[task]` times per round, interleaved
    (training leans on the tasks that take longest to learn; the held-out split stays even)."""
    if not weights:
        return TASKS
    known = TASKS + NEW_TASKS
    unknown = set(weights) - set(known)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; tasks are {', '.join(known)}")
    rounds = max(weights.values())
    return tuple(t for r in range(rounds) for t in known if weights.get(t, 0) > r)


def examples(n: int, seed: int, cycle: tuple[str, ...] = TASKS) -> list[Example]:
    """n examples, tasks in turn (`cycle`), from one seeded stream."""
    rng = random.Random(seed)
    return [example(rng, cycle[i % len(cycle)]) for i in range(n)]


def _save_examples(folder: Path, items: list[Example]) -> list[dict]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(items):
        name = f"images/{i:03d}-{ex.task}.png"
        ex.image.save(folder / name, optimize=True)
        rows.append({"image": name, "question": ex.question, "answer": ex.answer, "task": ex.task})
    return rows


def write_split(folder: Path, n: int = 200, seed: int = HELDOUT_SEED, cycle: tuple[str, ...] = TASKS) -> Path:
    """PNG files + questions.json ([{image, question, answer, task}]) for pocketvlm check / demo."""
    folder = Path(folder)
    rows = _save_examples(folder, examples(n, seed, cycle))
    (folder / "questions.json").write_text(json.dumps(rows, indent=1) + "\n")
    return folder / "questions.json"


def write_finetune_data(folder: Path, n: int, seed: int, cycle: tuple[str, ...]) -> Path:
    """PNG files + data.jsonl (one {image, question, answer, task} per line): a `pocketvlm finetune --data` set."""
    folder = Path(folder)
    rows = _save_examples(folder, examples(n, seed, cycle))
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


if __name__ == "__main__":
    print(write_split(Path(sys.argv[1] if len(sys.argv) > 1 else "samples/heldout")))
