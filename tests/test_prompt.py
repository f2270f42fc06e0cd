"""pocketvlm.prompt against transformers' own SmolVLM processor: the same tokens and pixels, token by token."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import draw_image, write_video
from PIL import Image

from pocketvlm.errors import PromptError
from pocketvlm.media import load_video, sample_frame_indices
from pocketvlm.prompt import Processor, Request


def hf_processor(model_dir, video_result=None):
    """transformers' SmolVLMProcessor built from its parts.

    Its video processor needs torchvision, which cannot be installed beside the CPU torch here; a stand-in returns
    frames we decoded, and everything else -- template, image processor, token expansion, video prompt,
    tokenization -- is transformers' code.
    """
    from transformers import PreTrainedTokenizerFast, SmolVLMImageProcessorPil, SmolVLMProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class FramesAlreadySampled(BaseVideoProcessor):
        def __init__(self):
            self.num_frames, self.fps = None, None

        def __call__(self, videos, **kwargs):
            return video_result

    class ProcessorWithoutTorchvision(SmolVLMProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(arg) if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    seq = json.loads((model_dir / "processor_config.json").read_text())["image_seq_len"]
    return ProcessorWithoutTorchvision(image_processor=SmolVLMImageProcessorPil.from_pretrained(model_dir),
                                       tokenizer=tokenizer, video_processor=FramesAlreadySampled(),
                                       image_seq_len=seq, chat_template=tokenizer.chat_template)


def hf_encode_images(model_dir, question, images):
    proc = hf_processor(model_dir)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return prompt, proc(text=prompt, images=[images] if images else None, return_tensors="np")


@pytest.mark.parametrize("size,mode", [
    ((200, 150), "RGB"),    # landscape: 2x2 tiles + global
    ((150, 200), "RGB"),    # portrait
    ((40, 30), "RGB"),      # small: upscaled, still split
    ((64, 64), "RGB"),      # square
    ((640, 90), "RGB"),     # extreme aspect: one row of tiles
    ((300, 301), "RGB"),    # odd sizes
    ((200, 150), "RGBA"),   # alpha composited on white
    ((200, 150), "L"),      # grayscale
])
def test_image_tokens_and_pixels_match_transformers(tiny_model, size, mode):
    image = draw_image(*size, mode=mode, seed=size[0])
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(size))
    question = "What color is the circle?"
    prompt, ref = hf_encode_images(tiny_model, question, [image])
    ours = Processor(tiny_model).encode(Request(question, images=[image]))
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ours.pixel_attention_mask, ref["pixel_attention_mask"].astype(bool))


def test_image_layout_is_smolvlm2s(tiny_model):
    """Spell out the layout once: tiles row by row with <row_r_col_c>, a blank line, then the global image."""
    proc = Processor(tiny_model)
    ours = proc.encode(Request("Q?", images=[draw_image(200, 150)]))
    n = proc.config.image_seq_len
    tile = lambda r, c: f"<fake_token_around_image><row_{r}_col_{c}>" + "<image>" * n  # noqa: E731
    expected = (f"<|im_start|>User:{tile(1, 1)}{tile(1, 2)}\n{tile(2, 1)}{tile(2, 2)}\n\n"
                f"<fake_token_around_image><global-img>{'<image>' * n}<fake_token_around_image>"
                f"Q?<end_of_utterance>\nAssistant:")
    assert ours.prompt == expected
    assert int((ours.input_ids == proc.image_token_id).sum()) == 5 * n


def test_unsplit_images_match_transformers(tiny_model, tmp_path):
    """With do_image_splitting off (a processor option), each image is one global tile."""
    import shutil

    model = tmp_path / "unsplit"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps({**config, "do_image_splitting": False}))
    image = draw_image(200, 150)
    _, ref = hf_encode_images(model, "What?", [image])
    ours = Processor(model).encode(Request("What?", images=[image]))
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert "<row_1_col_1>" not in ours.prompt and ours.pixel_values.shape == (1, 1, 3, 64, 64)
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])


def test_several_images_and_text_only_match_transformers(tiny_model):
    images = [draw_image(200, 150, seed=1), draw_image(64, 64, seed=2)]
    _, ref = hf_encode_images(tiny_model, "Compare them.", images)
    ours = Processor(tiny_model).encode(Request("Compare them.", images=images))
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])

    _, ref = hf_encode_images(tiny_model, "Say hi.", [])
    ours = Processor(tiny_model).encode(Request("Say hi."))
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert ours.pixel_values is None


@pytest.mark.parametrize("seconds,fps,max_frames", [(3.0, 10, 8), (0.4, 10, 8), (20.0, 5, 8), (12.0, 25, 64)])
def test_frame_sampling_matches_transformers(seconds, fps, max_frames):
    from types import SimpleNamespace

    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    total = int(seconds * fps)
    meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    # sample_frames needs only these two attributes of the (torchvision-bound) processor instance
    ref = SmolVLMVideoProcessor.sample_frames(SimpleNamespace(num_frames=max_frames, fps=1), meta)
    ours = sample_frame_indices(total, fps, total / fps, fps=1, max_frames=max_frames)
    assert ours.tolist() == ref.tolist()


def test_video_tokens_match_transformers(tiny_model, tmp_path):
    from transformers.video_utils import VideoMetadata

    proc = Processor(tiny_model)
    video = load_video(write_video(tmp_path / "clip.mp4", seconds=3.0, fps=10),
                       fps=proc.config.video_fps, max_frames=proc.config.video_max_frames)
    assert video.indices == [0, 14, 29] and video.total_frames == 30
    ours = proc.encode(Request("What happens?", video=video))

    meta = VideoMetadata(total_num_frames=video.total_frames, fps=video.fps, duration=video.duration,
                         frames_indices=video.indices)
    frames = ours.pixel_values  # pixels are ours (torchvision resizes them upstream); the text is transformers'
    hf = hf_processor(tiny_model, {"pixel_values": frames, "pixel_attention_mask": ours.pixel_attention_mask,
                                   "video_metadata": [meta]})
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    prompt = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ref = hf(text=prompt, videos=[video.frames], return_tensors="np")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert "You are provided the following series of three frames from a 0:00:03 [H:MM:SS] video." in ours.prompt
    assert "\nFrame from 00:01:" in ours.prompt
    assert ours.pixel_values.shape == (1, 3, 3, 64, 64)


def test_video_frame_pixels_follow_the_video_resize(tiny_model):
    """Frames are squashed to one square tile (SmolVLM2 never splits video frames)."""
    proc = Processor(tiny_model)
    frame = draw_image(96, 64)
    tile = proc.video_frame(frame)
    assert tile.shape == (3, 64, 64) and tile.dtype == np.float32
    assert -1.0 <= tile.min() and tile.max() <= 1.0


def test_reserved_tokens_and_empty_question_are_refused(tiny_model):
    proc = Processor(tiny_model)
    with pytest.raises(PromptError, match="reserved token '<image>'"):
        proc.encode(Request("what is <image> here?"))
    with pytest.raises(PromptError, match="empty"):
        proc.encode(Request("   "))


def test_prompt_longer_than_context_is_refused(tiny_model):
    proc = Processor(tiny_model)
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens, the model's context is 2048"):
        proc.encode(Request("why " * 3000))
