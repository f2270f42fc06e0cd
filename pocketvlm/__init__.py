"""pocketvlm: export, quantize, run and benchmark SmolVLM2 on devices, offline."""

__version__ = "0.1.0"
