"""Evaluation, one place for every stage that grades answers or compares backends: the samples (built-in probes, a
samples file, a folder of images, the held-out split), how an answer is graded, accuracy and agreement. `check`,
`bench`, `demo` and training all use it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import PocketVLMError
from .paths import user_path
from .media import Video, image_files, open_image
from .prompt import Request


@dataclass
class Sample:
    name: str
    request: Request
    answer: str | None = None
    image_paths: list[Path] = field(default_factory=list)  # where its images were read from (protected from --out)


def normalize_answer(text: str) -> str:
    """What grading compares: the answer without surrounding space, final punctuation or case."""
    return text.strip().strip(".!").strip().lower()


def is_correct(answer: str, expected: str) -> bool:
    return normalize_answer(answer) == normalize_answer(expected)


def accuracy(answers: list[str], expected: list[str]) -> float:
    return sum(is_correct(a, e) for a, e in zip(answers, expected)) / max(len(expected), 1)


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of answers equal to the reference backend's (after the same normalisation)."""
    return sum(normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, reference)) / max(len(reference), 1)


def builtin_samples() -> list[Sample]:
    """Drawn images, a short 'video' and a text-only question: deterministic inputs that cover every prompt path."""
    from PIL import Image, ImageDraw

    def picture(w, h, shapes):
        img = Image.new("RGB", (w, h), (245, 245, 240))
        d = ImageDraw.Draw(img)
        for kind, box, color in shapes:
            (d.ellipse if kind == "circle" else d.rectangle)(box, fill=color)
        return img

    circle = picture(320, 240, [("circle", (100, 60, 220, 180), (220, 30, 30))])
    squares = picture(480, 320, [("square", (x, 110, x + 100, 210), (30, 80, 210)) for x in (40, 190, 340)])
    frames = [picture(160, 120, [("circle", (10 + 40 * i, 40, 50 + 40 * i, 80), (20, 160, 40))]) for i in range(3)]
    clip = Video(frames=frames, indices=[0, 1, 2], fps=1.0, total_frames=3, duration=3.0)
    return [
        Sample("circle", Request("What color is the circle?", images=[circle])),
        Sample("squares", Request("How many squares are there?", images=[squares])),
        Sample("video", Request("Where does the circle move?", video=clip)),
        Sample("text", Request("Name three colors.")),
    ]


def load_samples(path: Path) -> list[Sample]:
    """A non-empty JSON list of {"image": path relative to the file, "question": ..., "answer"?: ...}; every item
    checked, a bad one named in one line."""
    path = user_path(path)
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PocketVLMError(f"{path}: no such samples file") from e
    except (OSError, ValueError, RecursionError) as e:
        raise PocketVLMError(f"{path}: unreadable samples file ({e.__class__.__name__})") from e
    if not isinstance(items, list) or not all(isinstance(i, dict) and "question" in i for i in items):
        raise PocketVLMError(f"{path}: expected a JSON list of objects with a 'question'")
    if not items:
        raise PocketVLMError(f"{path}: no samples (an empty list); give at least one {{image, question, answer}}")
    samples = []
    for i, item in enumerate(items):
        image = item.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise PocketVLMError(f"{path}: sample #{i}: 'image' must be a file path (a non-empty string)")
        for key in ("question", "answer", "name"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise PocketVLMError(f"{path}: sample #{i}: {key!r} must be a string, got "
                                     f"{type(item[key]).__name__}")
        image_paths = [path.parent / user_path(image)] if image else []
        images = [open_image(p) for p in image_paths]
        name = item.get("name") or (Path(image).stem if image else f"#{i}")
        samples.append(Sample(name, Request(item["question"], images=images), item.get("answer"), image_paths))
    return samples


def image_dir_samples(folder: Path, question: str = "Describe this image.") -> list[Sample]:
    """Every image in FOLDER, each asked the same question."""
    return [Sample(p.name, Request(question, images=[open_image(p)])) for p in image_files(folder)]


def heldout_file() -> Path:
    """samples/heldout/questions.json, the committed held-out split of the synthetic image-QA set."""
    return Path(str(resources.files("pocketvlm.samples") / "heldout" / "questions.json"))


def heldout_samples(limit: int | None = None) -> list[Sample]:
    """The held-out split as samples with answers; the first `limit` keep every task in turn (round-robin)."""
    samples = load_samples(heldout_file())
    return samples[:limit] if limit else samples


def heldout_accuracy(backend, n: int = 200, progress: bool = False) -> dict:
    """Exact-answer accuracy on the held-out split, per task and overall, through any backend."""
    from tqdm import tqdm

    from .synthetic import HELDOUT_SEED, examples

    per_task: dict[str, list[bool]] = {}
    for ex in tqdm(examples(n, HELDOUT_SEED), desc="held-out", disable=not progress, leave=False):
        answer = backend.run(Request(ex.question, images=[ex.image]), 8).answer
        per_task.setdefault(ex.task, []).append(is_correct(answer, ex.answer))
    total = [ok for oks in per_task.values() for ok in oks]
    return {"accuracy": sum(total) / len(total), "n": len(total),
            "per_task": {task: sum(oks) / len(oks) for task, oks in per_task.items()}}
