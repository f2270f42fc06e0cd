"""Quantize: an exported artifact -> a lower-bit artifact of the same format, plus its fidelity report."""
