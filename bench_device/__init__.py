"""Edge bench: load, TTFT, prefill/decode speed, memory and size per backend and quant, against the cloud."""
