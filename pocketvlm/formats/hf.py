"""The reference "format": a Hugging Face SmolVLM2 folder (a checkpoint, or a make-model folder whose manifest says
format "hf"), run by transformers in fp32. A source for export, never a target."""

from .base import Format

FORMAT = Format(name="hf", title="PyTorch reference (transformers, fp32)", extra=None, backend="ReferenceBackend",
                module="reference")
