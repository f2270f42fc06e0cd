"""Core ML: two ML Program packages and a host-side embedding table, shared by export/coreml.py,
quantize/coreml.py and runtime/coreml.py.

    VisionEncoder.mlpackage  pixel_values [tiles, 3, S, S] f32 (tiles: a range, 1..max tiles of one request)
                             -> image_features [tiles, image_seq_len, hidden] f32
    TextDecoder.mlpackage    inputs_embeds [1, q, hidden] f32, position_ids [1, q] i32,
                             causal_mask [1, 1, q, end] f32 (0 = attend, MASKED = masked; end = past + q)
                             -> logits [1, 1, vocab] f32 (the last position only)
                             states k_cache / v_cache [layers, 1, kv_heads, max_context, head_dim] f16
                             (a stateful KV cache: ct.StateType, iOS 18 / macOS 15 and later)
    embed_tokens.npy         [vocab, hidden] f16: the token embeddings, looked up on the host

Also the coremltools glue every stage needs without importing torch: a quiet import and a quiet block.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from .base import Format, Option

VISION = "VisionEncoder.mlpackage"
DECODER = "TextDecoder.mlpackage"
EMBEDDINGS = "embed_tokens.npy"
PACKAGES = (VISION, DECODER)
MASKED = -1e4  # the causal mask's "no": finite, so fp16 softmax never sees inf - inf
# the stateful KV cache needs ML Program states: iOS 18 / macOS 15 and later
TARGETS = ("iOS18", "macOS15", "watchOS11", "tvOS18")
DEFAULT_MAX_CONTEXT = 4096

# The compute units an artifact is loaded with (unless --threads pins CPU_ONLY), per quant, chosen against two
# upstream traps for low-bit models:
#   apple/coreai-models #279: 8-bit *per-block* int weights give wrong output on the Neural Engine. Our int8 is per
#     output channel, not per block: avoided, int8 runs everywhere (ALL).
#   apple/coremltools #2716: 4-bit *palettized stateful* models built with coremltools 9.0 crash on CPU_AND_NE.
#     Our int4 is linear, not palettized (quantize/coreml.py's palettize path, exactly that case, is not a --quant),
#     but it is 4-bit, stateful, built with the same coremltools, and per block -- the granularity #279 reports
#     wrong on the Neural Engine and coremltools' docs aim at the GPU. So int4 stays off the Neural Engine.
# Unverified on a Mac (none here): the export and the README say so.
COMPUTE_UNITS = {"fp16": "ALL", "int8": "ALL", "int4": "CPU_AND_GPU"}
INT4_NOTE = ("int4 Core ML artifacts run on CPU and GPU, not the Neural Engine: 4-bit per-block weights in a "
             "stateful model are what apple/coreai-models#279 (wrong output) and apple/coremltools#2716 (crash, "
             "coremltools 9.0) report on the Neural Engine; int8 (per channel) and fp16 use all compute units")


def compute_units(quant: str) -> str:
    return COMPUTE_UNITS.get(quant, "ALL")


def compute_units_note(quant: str) -> str | None:
    """What to tell the user about the compute units a QUANT artifact runs on (None: nothing to say)."""
    return INT4_NOTE if compute_units(quant) != "ALL" else None


def causal_mask(q: int, end: int) -> np.ndarray:
    """[1, 1, q, end] float32: query i (at position end - q + i) sees keys 0 .. end - q + i."""
    return np.triu(np.full((q, end), MASKED, dtype=np.float32), k=end - q + 1)[None, None]


def import_coremltools():
    """coremltools, without its import-time chatter on Linux ("Failed to load _MLModelProxy ..." x8, a torch
    version note): prediction needs macOS, conversion does not."""
    import io
    import logging
    import warnings

    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import coremltools as ct
            logging.getLogger("coremltools").setLevel(logging.ERROR)
    finally:
        root.setLevel(level)
    return ct


@contextlib.contextmanager
def quiet():
    """coremltools' progress bars and torch's tracer warnings, out of the user's way."""
    import io
    import logging
    import warnings

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


FORMAT = Format(
    name="coreml", title="Core ML (coremltools)", extra="coreml", backend="CoreMLBackend",
    export_quants=("fp16", "int8", "int4"), quantize_quants=("int8", "int4"), quantize_from=("fp16",),
    options=(
        Option("max_context", "coreml: KV-cache length of the stateful decoder (default: the model's context, at "
                              "most 4096)", type=int, metavar="N"),
        Option("deployment_target", "coreml: minimum deployment target (default iOS18; the stateful KV cache needs "
                                    "iOS 18 / macOS 15)", metavar="OS"),
    ),
    runs_on=("Darwin",),
)
