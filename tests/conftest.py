"""Shared fixtures: the network guard, the tiny model (built once per session), images, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NETGUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(NETGUARD_DIR))
import sitecustomize as netguard  # noqa: E402  (our guard module, loaded by path)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


# ------------------------------------------------------------------------------------------ network guard

@pytest.fixture(scope="session", autouse=True)
def _network_guard(tmp_path_factory):
    log = tmp_path_factory.mktemp("netguard") / "violations.log"
    log.touch()
    os.environ["POCKETVLM_NETGUARD_LOG"] = str(log)
    # subprocesses load the guard as sitecustomize; HF libraries must not even try the Hub
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD_DIR), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    netguard.install()
    yield log


@pytest.fixture(autouse=True)
def _no_network(_network_guard):
    before = _network_guard.read_text()
    yield
    new = _network_guard.read_text()[len(before):]
    assert not new, f"test reached beyond loopback:\n{new}"


@pytest.fixture
def allow_network_attempt(_network_guard):
    """For the guard's own test: forget violations the test caused on purpose."""
    before = _network_guard.read_text()
    yield
    _network_guard.write_text(before)


# ---------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pocketvlm.make_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def reference(tiny_model):
    from pocketvlm.runtime.reference import ReferenceBackend

    return ReferenceBackend(tiny_model)


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    import torch
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()


def reference_image_features(model, pixel_values, pixel_attention_mask):
    """transformers' image features (vision tower + connector) for [1, tiles, 3, H, W] pixels, the all-zero padding
    tiles dropped as transformers drops them: a float32 [tiles * image_seq_len, hidden] array, what every export's
    vision part must reproduce."""
    import torch

    with torch.inference_mode():
        out = model.get_image_features(pixel_values=torch.as_tensor(pixel_values),
                                       pixel_attention_mask=torch.as_tensor(pixel_attention_mask), return_dict=True)
    features = out.pooler_output
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1]).float().numpy()


# ---------------------------------------------------------------------------------------------- media

def draw_image(width=200, height=150, mode="RGB", seed=0):
    """A deterministic picture with shapes and noise, so every tile differs."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    d = ImageDraw.Draw(base)
    d.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(220, 30, 30))
    d.rectangle((width // 2, height // 2, width - 4, height - 4), fill=(20, 200, 40))
    return base.convert(mode) if mode != "RGB" else base


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, size=(96, 64), codec="mpeg4") -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            arr[:, : (i * 7) % size[0]] = (200, 40, 40)
            arr[: (i * 5) % size[1], :, 2] = 220
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    draw_image().save(path)
    return path


@pytest.fixture
def video_file(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4")


# ------------------------------------------------------------------------------------------------ CLI

def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m pocketvlm ARGS` as a user would, in a subprocess (with the network guard)."""
    return subprocess.run([sys.executable, "-m", "pocketvlm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one line on stderr starting with 'pocketvlm: error:', no traceback, and the given fragments."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pocketvlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
