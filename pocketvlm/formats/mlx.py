"""MLX (mlx-vlm): the artifact is a plain mlx-vlm model folder (its own layout: config.json, model*.safetensors,
the processor files) plus pocketvlm.json, so `mlx_vlm.load` opens it as it is."""

from .base import Format, Option

# the float dtype each unquantized quant name means; 8bit/4bit convert from fp16
DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
BITS = {"8bit": 8, "4bit": 4}
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64

FORMAT = Format(
    name="mlx", adapters=True, title="MLX (mlx-vlm)", extra="mlx", backend="MLXBackend",
    export_quants=("fp16", "fp32", "bf16", "8bit", "4bit"),
    quantize_quants=("8bit", "4bit"), quantize_from=("fp16", "fp32", "bf16"),
    options=(
        Option("group_size", "mlx: quantization group size, 32, 64 or 128 (default 64)", type=int),
        Option("keep_vision", "mlx 8bit/4bit: keep the vision tower unquantized in fp16, as Hugging Face's iOS "
                              "builds do (default: quantize it too, where the group size divides its layers)",
               choices=("fp16",)),
    ),
)
