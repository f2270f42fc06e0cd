"""The reference backend: the same greedy tokens as transformers' generate(), streamed with honest timings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import draw_image, write_video

from pocketvlm.errors import ArtifactError, SourceError
from pocketvlm.media import load_video
from pocketvlm.prompt import Request
from pocketvlm.runtime import open_backend
from pocketvlm.runtime.reference import ReferenceBackend


def hf_generate(model, encoded, max_new_tokens):
    inputs = {"input_ids": torch.from_numpy(encoded.input_ids)[None]}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if encoded.pixel_values is not None:
        inputs["pixel_values"] = torch.from_numpy(encoded.pixel_values)
        inputs["pixel_attention_mask"] = torch.from_numpy(encoded.pixel_attention_mask)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [s[0].numpy() for s in out.scores]


def requests(tmp_path, processor):
    video = load_video(write_video(tmp_path / "v.mp4"), fps=processor.config.video_fps,
                       max_frames=processor.config.video_max_frames)
    return {
        "image": Request("What color is the circle?", images=[draw_image(200, 150)]),
        "two images": Request("Which is bigger?", images=[draw_image(120, 90, seed=3), draw_image(64, 64, seed=4)]),
        "video": Request("What happens in the video?", video=video),
        "text only": Request("Tell me a story."),
    }


def test_greedy_tokens_and_logits_equal_transformers_generate(reference, hf_model, tmp_path):
    for name, request in requests(tmp_path, reference.processor).items():
        ours = reference.run(request, 32, with_logits=True)
        ref_ids, ref_scores = hf_generate(hf_model, reference.processor.encode(request), 32)
        assert ours.token_ids == ref_ids, name
        assert len(ours.logits) == len(ref_scores)
        for a, b in zip(ours.logits, ref_scores):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_images_change_the_answer(reference):
    """A vision path that ignored pixels would pass token equality with itself; check pixels matter."""
    a = reference.run(Request("What is it?", images=[draw_image(200, 150, seed=1)]), 8, with_logits=True)
    b = reference.run(Request("What is it?", images=[draw_image(200, 150, seed=2)]), 8, with_logits=True)
    assert np.abs(a.logits[0] - b.logits[0]).max() > 1e-3


def test_ignore_eos_generates_exactly_max_tokens_and_times_every_stage(reference):
    request = Request("Hi?", images=[draw_image()])
    result = reference.run(request, 12, ignore_eos=True)
    assert len(result.token_ids) == 12
    t = result.timings
    assert t.load_s > 0 and t.encode_s > 0 and t.ttft_s >= t.encode_s
    assert t.prefill_tok_s > 0 and t.decode_tok_s > 0 and t.total_s >= t.ttft_s
    assert result.prompt_tokens == len(reference.prompt_token_ids(request))


def test_streamed_text_adds_up_to_the_answer(reference):
    request = Request("Describe.", images=[draw_image(seed=5)])
    pieces = []
    result = reference.run(request, 24, ignore_eos=True, on_step=lambda s: pieces.append(s.text))
    assert "".join(pieces).strip() == result.answer
    assert result.answer == reference.processor.decode(result.token_ids).strip()


def test_stops_at_end_of_utterance(reference):
    eos = next(iter(reference.processor.eos_token_ids))
    original = reference.model.lm_head.bias
    # force <end_of_utterance> as the greedy choice from the third token on: the loop must stop right there
    steps = []
    for step in reference.generate(Request("Hi?"), 10):
        steps.append(step.token_id)
        if len(steps) == 2:
            reference.model.lm_head.bias = torch.nn.Parameter(
                torch.where(torch.arange(reference.model.lm_head.out_features) == eos, 1e4, 0.0))
    reference.model.lm_head.bias = original
    assert steps[-1] == eos and len(steps) == 3


def test_open_backend_picks_reference_for_a_hf_folder(tiny_model):
    backend = open_backend(tiny_model)
    assert isinstance(backend, ReferenceBackend)
    assert backend.describe()["backend"] == "reference"


def test_open_backend_refuses_what_it_cannot_run(tmp_path, tiny_model):
    with pytest.raises(SourceError, match="no such folder"):
        open_backend(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        open_backend(tmp_path / "empty")
    art = tmp_path / "future"
    art.mkdir()
    (art / "model.tflite").write_bytes(b"")
    (art / "pocketvlm.json").write_text('{"schema": 1, "format": "tflite", "quant": "int8", "files": [{"path": '
                                        '"model.tflite", "bytes": 0, "sha256": "' + "0" * 64 + '"}]}')
    with pytest.raises(ArtifactError, match="'tflite' artifacts are not supported"):
        open_backend(art)


def test_text_stream_emits_whole_characters_only(reference):
    from pocketvlm.runtime.base import TextStream

    text = "Colors: é ü 🙂 日本 and 42.\n\nDone"
    ids = reference.processor.tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(reference.processor)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # multi-byte characters were held back until complete
