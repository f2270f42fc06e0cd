"""ONNX: the three-part SmolVLM layout Hugging Face's ONNX repos use and transformers.js loads, shared by
export/onnx.py, quantize/onnx.py and runtime/onnx.py.

    onnx/vision_encoder{sfx}.onnx        pixel_values [batch, tiles, 3, S, S] f32 + pixel_attention_mask bool
                                         -> image_features [batch*tiles, image_seq_len, hidden]
    onnx/embed_tokens{sfx}.onnx          input_ids [batch, seq] i64 -> inputs_embeds [batch, seq, hidden]
    onnx/decoder_model_merged{sfx}.onnx  inputs_embeds, attention_mask [batch, past+seq], position_ids [batch, seq],
                                         past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
                                         -> logits [batch, seq, vocab], present.{i}.key|value
    (sfx: "" fp32, "_fp16", "_int8", "_q4"; every graph keeps its weights beside it in <file>.onnx_data)
"""

from .base import Format

SUBFOLDER = "onnx"
PARTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# transformers.js names its dtypes as we name our quants; config.json["transformers.js_config"]["dtype"] says which
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q4": "_q4"}
DATA_SUFFIX = "_data"  # weights of X.onnx live in X.onnx_data (the Hugging Face / transformers.js convention)


def part_file(quant: str, part: str) -> str:
    """Path of one part inside an artifact, relative to its root."""
    return f"{SUBFOLDER}/{part}{SUFFIXES[quant]}.onnx"


def past_name(output_name: str) -> str:
    return output_name.replace("present.", "past_key_values.", 1)


FORMAT = Format(
    name="onnx", title="ONNX (onnxruntime, transformers.js)", extra="onnx", backend="ONNXBackend",
    export_quants=("fp32", "fp16", "int8", "q4"), quantize_quants=("int8", "q4"), quantize_from=("fp32",),
)
