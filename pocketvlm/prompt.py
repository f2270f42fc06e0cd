"""SmolVLM2's prompt layout without torch, torchvision or transformers: chat template, image splitting, token
expansion, video frames. Every backend uses this, so every backend sees the same tokens and pixels.

It mirrors transformers' SmolVLMProcessor + SmolVLMImageProcessorPil step by step (resize the longest edge, resize
up to a multiple of the tile size, cut tiles row by row, add the global image, rescale, normalize) and its video
prompt (frame count in words, H:MM:SS duration, a timestamp per frame); tests compare both token by token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PromptError, SourceError
from .media import Video, to_rgb

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized longest edge

FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
GLOBAL_IMAGE = "<global-img>"
VIDEO = "<video>"
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
MEDIA_OUTTRO = "\n\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"

# transformers switches to this template whenever a video is in the conversation.
DEFAULT_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class Request:
    """One question about images or a video: built once, given to any backend."""

    question: str
    images: list[Image.Image] | None = None
    video: Video | None = None


@dataclass
class Encoded:
    """A request as model inputs. pixel_values: [1, tiles, 3, S, S] float32; mask: [1, tiles, S, S] bool."""

    prompt: str
    input_ids: np.ndarray
    pixel_values: np.ndarray | None
    pixel_attention_mask: np.ndarray | None

    @property
    def tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[1])


@dataclass(frozen=True)
class ProcessorConfig:
    image_seq_len: int
    longest_edge: int
    max_image_size: int
    do_resize: bool
    do_image_splitting: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int
    video_fps: float
    video_max_frames: int
    video_longest_edge: int
    context_length: int

    @classmethod
    def from_dir(cls, path: Path) -> "ProcessorConfig":
        from .jsonfile import read_json

        path = Path(path)
        what = "not a SmolVLM model folder"
        config = read_json(path / "config.json", what)
        proc_path = path / "processor_config.json"
        proc = read_json(proc_path, what) if proc_path.is_file() else {}
        # a folder saved by a transformers 5 processor repeats the image processor's settings inside
        # processor_config.json, and AutoProcessor prefers those: so do we
        pre = proc.get("image_processor") if isinstance(proc.get("image_processor"), dict) else \
            read_json(path / "preprocessor_config.json", what)
        vision = config.get("vision_config", {})
        # image_seq_len is stated by the processor; else derived as the model derives it.
        seq = proc.get("image_seq_len") or (
            (vision["image_size"] // vision["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2)
        sampling = pre.get("video_sampling", {})
        size = pre.get("size", {}).get("longest_edge")
        try:
            return cls(
                image_seq_len=int(seq),
                longest_edge=int(size),
                max_image_size=int(pre["max_image_size"]["longest_edge"]),
                do_resize=bool(pre.get("do_resize", True)),
                do_image_splitting=bool(pre.get("do_image_splitting", True)),
                do_rescale=bool(pre.get("do_rescale", True)),
                rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
                do_normalize=bool(pre.get("do_normalize", True)),
                image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
                image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
                resample=int(pre.get("resample", Image.Resampling.LANCZOS)),
                video_fps=float(sampling.get("fps", 1)),
                video_max_frames=int(sampling.get("max_frames", 64)),
                # transformers' video processor replaces video_size with the image `size` whenever both exist
                video_longest_edge=int(size or sampling.get("video_size", {}).get("longest_edge")),
                context_length=int(config["text_config"]["max_position_embeddings"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"{path}: incomplete processor/model config ({e.__class__.__name__}: {e}); {what}") \
                from e


def check_image_size(image_size) -> int:
    """--image-size: the longest edge an image is resized to before tiling, 1 .. 4096 px (transformers' cap)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise PromptError(f"--image-size {image_size}: give the longest edge in pixels, 1 to {MAX_IMAGE_SIZE} (a "
                          f"multiple of the model's tile size: that many tiles a side)")
    return image_size


class Processor:
    """Tokenizer + chat template + image/video preprocessing for one SmolVLM folder (or artifact holding its files).

    image_size: the image budget -- the longest edge images (and video frames) are resized to before tiling --
    instead of the folder's own (SmolVLM2's default is 4 tiles a side: 2048 px at 256M/500M). At the tile size
    (512 px there) an image is one tile: 64 image tokens instead of 13 x 64."""

    def __init__(self, path: Path, image_size: int | None = None):
        from dataclasses import replace

        from tokenizers import Tokenizer

        self.path = Path(path)
        self.config = ProcessorConfig.from_dir(self.path)
        if image_size is not None:
            size = check_image_size(image_size)
            self.config = replace(self.config, longest_edge=size, video_longest_edge=size)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception on a bad file
            raise SourceError(f"{self.path / 'tokenizer.json'}: unreadable tokenizer ({str(e)[:120]})") from e
        self.chat_template = _find_chat_template(self.path)
        self.special_tokens = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self.image_token_id = self.tokenizer.token_to_id(IMAGE)
        if self.image_token_id is None:
            raise SourceError(f"{self.path}: the tokenizer has no {IMAGE} token; not a SmolVLM tokenizer")

    @cached_property
    def eos_token_ids(self) -> set[int]:
        from .jsonfile import read_json

        gen_path = self.path / "generation_config.json"
        ids = read_json(gen_path, "").get("eos_token_id") if gen_path.is_file() else None
        if ids is None:
            ids = self.tokenizer.token_to_id("<end_of_utterance>")
        return set(ids) if isinstance(ids, list) else {ids}

    # ------------------------------------------------------------------------------------------------- text

    def render(self, request: Request) -> str:
        """The chat-templated prompt with <image>/<video> placeholders, before expansion."""
        content = [{"type": "image"} for _ in request.images or ()]
        if request.video is not None:
            content.append({"type": "video"})
        content.append({"type": "text", "text": request.question})
        template = DEFAULT_CHAT_TEMPLATE if request.video is not None else self.chat_template
        return _jinja(template).render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)



    def encode(self, request: Request) -> Encoded:
        self._check_question(request)
        prompt = self.render(request)
        tiles, masks, expansions = [], [], []
        for image in request.images or ():
            image_tiles, rows, cols = self.image_tiles(image)
            tiles += image_tiles
            expansions.append(self.image_prompt(rows, cols))
        if request.video is not None:
            tiles += [self.video_frame(frame) for frame in request.video.frames]
        if expansions:
            parts = prompt.split(IMAGE)
            prompt = parts[0] + "".join(e + p for e, p in zip(expansions, parts[1:]))
        if request.video is not None:
            prompt = prompt.replace(VIDEO, self.video_prompt(request.video), 1)
        ids = np.asarray(self.tokenizer.encode(prompt, add_special_tokens=True).ids, dtype=np.int64)
        if len(ids) >= self.config.context_length:
            raise PromptError(f"the prompt is {len(ids)} tokens, the model's context is "
                              f"{self.config.context_length}; shorten the question or use fewer/smaller images")
        if not tiles:
            return Encoded(prompt, ids, None, None)
        pixels, masks = _pad_tiles(tiles)
        return Encoded(prompt, ids, pixels[None], masks[None])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _check_question(self, request: Request) -> None:
        if not isinstance(request.question, str):
            raise PromptError(f"the question must be text, not {type(request.question).__name__}")
        if not request.question or not request.question.strip():
            raise PromptError("the question is empty")
        try:
            request.question.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 on the command line
            raise PromptError("the question is not valid UTF-8 text (it holds bytes that are not characters); "
                              "check the terminal's encoding") from e
        reserved = [t for t in self.special_tokens | {VIDEO} if t in request.question]
        if reserved:
            raise PromptError(f"the question contains the reserved token {sorted(reserved)[0]!r}; "
                              f"pass images with --image/--video, not as text")

    def image_prompt(self, rows: int, cols: int) -> str:
        n = self.config.image_seq_len
        global_image = f"{FAKE_IMAGE}{GLOBAL_IMAGE}{IMAGE * n}{FAKE_IMAGE}"
        if rows == 0 and cols == 0:
            return global_image
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{FAKE_IMAGE}<row_{r + 1}_col_{c + 1}>{IMAGE * n}"
            text += "\n"
        return text + "\n" + global_image

    def video_prompt(self, video: Video) -> str:
        from num2words import num2words

        n = self.config.image_seq_len
        duration = int(video.duration) if video.duration is not None else int(video.timestamps[-1])
        text = VIDEO_INTRO.format(frame_count=num2words(len(video.frames)),
                                  video_duration=str(timedelta(seconds=duration)))
        for second in video.timestamps:
            stamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
            text += FRAME_TIMESTAMP.format(timestamp=stamp) + f"{FAKE_IMAGE}{GLOBAL_IMAGE}{IMAGE * n}{FAKE_IMAGE}"
        return text + MEDIA_OUTTRO

    # ------------------------------------------------------------------------------------------------ pixels

    def image_tiles(self, image: Image.Image) -> tuple[list[np.ndarray], int, int]:
        """Float32 CHW tiles (row by row, then the global image) and the tile grid (0, 0 when not split)."""
        cfg = self.config
        img = to_rgb(image)
        if cfg.do_resize:
            img = self._resize(img, *_fit_longest_edge(img.height, img.width, cfg.longest_edge))
        side = cfg.max_image_size
        if not cfg.do_image_splitting:
            return [self.normalize(self._resize(img, side, side))], 0, 0
        img = self._resize(img, *_round_up_to_tiles(img.height, img.width, side))
        if img.height <= side and img.width <= side:
            return [self.normalize(img)], 0, 0
        rows = (img.height - side) // side + 1
        cols = (img.width - side) // side + 1
        pixels = np.asarray(img)
        tiles = [pixels[r * side:(r + 1) * side, c * side:(c + 1) * side] for r in range(rows) for c in range(cols)]
        tiles.append(np.asarray(self._resize(img, side, side)))
        return [self.normalize(t) for t in tiles], rows, cols

    def video_frame(self, frame: Image.Image) -> np.ndarray:
        """One sampled frame: longest edge to the video size, then squashed to one square tile (no splitting)."""
        cfg = self.config
        img = to_rgb(frame)
        h, w = _fit_longest_edge(img.height, img.width, min(MAX_IMAGE_SIZE, cfg.video_longest_edge), cap=False)
        img = self._resize(img, h, w)
        return self.normalize(self._resize(img, cfg.max_image_size, cfg.max_image_size))

    def _resize(self, img: Image.Image, height: int, width: int) -> Image.Image:
        return img.resize((width, height), resample=self.config.resample)

    def normalize(self, pixels) -> np.ndarray:
        """An HWC uint8 picture (a tile) as the model's CHW float32 input: rescaled, then normalized."""
        cfg = self.config
        x = np.asarray(pixels).transpose(2, 0, 1)  # HWC uint8 -> CHW
        if cfg.do_rescale:
            x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        if cfg.do_normalize:
            x = x.astype(np.float32, copy=False)
            mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x.astype(np.float32, copy=False)


def _fit_longest_edge(height: int, width: int, longest: int, cap: bool = True) -> tuple[int, int]:
    """Scale so the longest edge is `longest`, the other edge rounded up to even (as transformers does)."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if cap:  # keep below the absolute cap, preserving the aspect ratio
        aspect = width / height
        if width >= height and width > MAX_IMAGE_SIZE:
            width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
        elif height > width and height > MAX_IMAGE_SIZE:
            height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
        height, width = max(height, 1), max(width, 1)
    return height, width


def _round_up_to_tiles(height: int, width: int, side: int) -> tuple[int, int]:
    """Resize target whose both edges are multiples of the tile size, keeping the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / side) * side
        height = math.ceil(int(width / aspect) / side) * side
    else:
        height = math.ceil(height / side) * side
        width = math.ceil(int(height * aspect) / side) * side
    return height, width


def _pad_tiles(tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack tiles, zero-padding bottom/right to the largest, with a mask of real pixels."""
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    pixels = np.zeros((len(tiles), 3, h, w), dtype=np.float32)
    masks = np.zeros((len(tiles), h, w), dtype=bool)
    for i, t in enumerate(tiles):
        pixels[i, :, :t.shape[1], :t.shape[2]] = t
        masks[i, :t.shape[1], :t.shape[2]] = True
    return pixels, masks


def _find_chat_template(path: Path) -> str:
    """The model's own template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                template = json.loads(f.read_text()).get("chat_template")
            except (OSError, json.JSONDecodeError):
                template = None
            if isinstance(template, str):
                return template
    return DEFAULT_CHAT_TEMPLATE


@lru_cache(maxsize=8)
def _jinja(template: str):
    # The environment transformers renders chat templates in, so whitespace handling is identical.
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"the chat template refused the request: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
