"""The only place images and videos are opened and validated. Anything unusable is a one-line MediaError."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MediaError

# A 64-megapixel photo is already 30x more than the largest tile grid uses; beyond that it is a decompression
# bomb or a mistake, and decoding it would cost gigabytes.
MAX_PIXELS = 64_000_000
MAX_SIDE = 20_000
# Modes whose meaning is plain RGB(A)/gray. Others (CMYK, 16-bit/float, palette, LAB, ...) would be converted
# silently and lossily, so the user is asked to convert them on purpose.
SUPPORTED_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "1"}
MODE_HINTS = {
    "CMYK": "CMYK (print) colours",
    "P": "a palette (indexed colours)",
    "PA": "a palette (indexed colours) with alpha",
    "I;16": "16-bit samples", "I;16B": "16-bit samples", "I;16L": "16-bit samples", "I;16N": "16-bit samples",
    "I": "32-bit integer samples",
    "F": "32-bit float samples",
}


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(folder) -> list[Path]:
    """The image files of a folder, sorted by name (opened and validated later, by open_image)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: no such folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MediaError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def check_file(path: Path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a folder, not {kind}")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    return path


def _check_size(path, width: int, height: int, what: str = "image") -> None:
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise MediaError(f"{path}: {what} is {width}x{height} ({width * height / 1e6:.0f} MP), over the limit of "
                         f"{MAX_PIXELS // 1_000_000} MP / {MAX_SIDE} px a side; downscale it first")


def open_image(path) -> Image.Image:
    """Open, validate and fully decode an image file."""
    path = check_file(path, "an image")
    return _decode(path, path)


def open_image_bytes(data: bytes, label: str = "image") -> Image.Image:
    """The same checks for an image that arrived as bytes (an upload, a data URL)."""
    import io

    if not data:
        raise MediaError(f"{label}: empty image (0 bytes)")
    return _decode(io.BytesIO(data), label)


def _decode(source, label) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except UnidentifiedImageError as e:
        raise MediaError(f"{label}: not an image (unknown format or corrupt header)") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"{label}: image is over the decompression-bomb limit; downscale it first") from e
    except OSError as e:
        raise MediaError(f"{label}: cannot open image ({e})") from e
    _check_size(label, *image.size)
    if getattr(image, "n_frames", 1) > 1:
        raise MediaError(f"{label}: animated image with {image.n_frames} frames; pass a still image, "
                         f"or the clip with --video")
    if image.mode not in SUPPORTED_MODES:
        what = MODE_HINTS.get(image.mode, f"mode {image.mode}")
        raise MediaError(f"{label}: image uses {what} (PIL mode {image.mode}); convert it to 8-bit RGB first")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{label}: corrupt or truncated image ({e})") from e
    return image


# ------------------------------------------------------------------------------ sizes before decoding

# What one request may cost to decode, whatever the model: a 12-megapixel phone photo and then some. The model
# itself never looks at more than its longest-edge setting squared per image (it downsizes to that, then cuts
# tiles); a budget of several such images' worth leaves room for pictures sent larger than the model needs.
MIN_PIXEL_BUDGET = 16_000_000
IMAGES_WORTH = 8
_warnings_lock = threading.Lock()  # warnings.catch_warnings is process-wide state


class PixelBudgetError(MediaError):
    """Images whose pixels, summed, are over what one request may decode (a server answers 413)."""


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str  # PIL's name: PNG, JPEG, WEBP, GIF, ...

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_header(source, label=None) -> ImageHeader:
    """An image's size and format from its header alone (a path or bytes): PIL parses the header when opening
    and decodes pixels only on load(), so a 64-megapixel PNG costs a few bytes here, not 200 MB."""
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise MediaError(f"{label or 'image'}: empty image (0 bytes)")
        fp, label = io.BytesIO(source), label or "image"
    else:
        path = check_file(source, "an image")
        fp, label = path, label or path
    try:
        with _warnings_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                width, height = image.size
                kind = image.format or "unknown"
    except Image.DecompressionBombError as e:
        raise PixelBudgetError(f"{label}: image claims over {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} MP "
                               f"(a decompression bomb); downscale it first") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{label}: not an image (unknown format or corrupt header)") from e
    except Exception as e:  # PIL's format plugins raise all sorts on crafted headers; none of it is usable
        raise MediaError(f"{label}: unreadable image header ({e.__class__.__name__})") from e
    if width < 1 or height < 1:
        raise MediaError(f"{label}: image header says {width}x{height}")
    return ImageHeader(width, height, kind)


def default_pixel_budget(longest_edge: int) -> int:
    """Pixels one request may carry by default: IMAGES_WORTH images at what the model can see (its longest-edge
    setting squared), and never less than MIN_PIXEL_BUDGET."""
    return max(MIN_PIXEL_BUDGET, IMAGES_WORTH * int(longest_edge) ** 2)


def check_pixel_budget(headers: Sequence[ImageHeader], budget: int, *, hint: str = "send smaller images") -> int:
    """The total pixels of one request's images, or PixelBudgetError when over budget. Call it with the headers
    (read_image_header) before decoding anything."""
    total = sum(h.pixels for h in headers)
    if total > budget:
        sizes = ", ".join(f"{h.width}x{h.height}" for h in headers[:4]) + (", ..." if len(headers) > 4 else "")
        raise PixelBudgetError(f"the {'image is' if len(headers) == 1 else f'{len(headers)} images are'} "
                               f"{total / 1e6:.1f} MP ({sizes}), over the budget of {budget / 1e6:.1f} MP per "
                               f"request; {hint}")
    return total


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class Video:
    """Frames sampled from a clip, with what SmolVLM2's prompt says about them."""

    frames: list[Image.Image]
    indices: list[int]
    fps: float            # the clip's frame rate
    total_frames: int
    duration: float | None  # seconds

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices]


def sample_frame_indices(total_frames: int, video_fps: float, duration: float, *, fps: float, max_frames: int,
                         skip_secs: float = 1) -> np.ndarray:
    """SmolVLM2's frame sampling: `fps` frames a second, at most `max_frames`, uniformly spaced, skipping the
    first and last second of long clips (transformers' SmolVLMVideoProcessor.sample_frames)."""
    desired = max(min(int(round(fps * duration)), max_frames), 1)
    start, end = 0, total_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * video_fps)
        end = int(total_frames - skip_secs * video_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def load_video(path, *, fps: float, max_frames: int) -> Video:
    """Decode a clip with PyAV and keep SmolVLM2's sampled frames."""
    import av

    path = check_file(path, "a video")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: not a video PyAV can read ({e.__class__.__name__})") from e
    with container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise MediaError(f"{path}: is a still image ({container.format.name}), not a video; pass it with --image")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if rate <= 0:
            raise MediaError(f"{path}: the video stream has no frame rate")
        total = stream.frames or _count_frames(container, stream, path)
        if total <= 0:
            raise MediaError(f"{path}: the video has no frames")
        duration = total / rate
        wanted = sample_frame_indices(total, rate, duration, fps=fps, max_frames=max_frames).tolist()
        container.seek(0)
        frames, kept, index = [], [], 0
        want = set(wanted)
        try:
            for frame in container.decode(stream):
                if index in want:
                    _check_size(path, frame.width, frame.height, "video frame")
                    frames.append(frame.to_image())
                    kept.append(index)
                index += 1
                if index > wanted[-1]:
                    break
        except av.error.FFmpegError as e:
            if not frames:
                raise MediaError(f"{path}: corrupt video ({e.__class__.__name__})") from e
    if not frames:
        raise MediaError(f"{path}: no decodable frames")
    return Video(frames=frames, indices=kept, fps=rate, total_frames=int(total), duration=duration)


def _count_frames(container, stream, path) -> int:
    # Some containers (webm, some mkv) do not store a frame count: count by demuxing.
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as e:
        raise MediaError(f"{path}: corrupt video ({e.__class__.__name__})") from e
