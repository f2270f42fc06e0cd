"""Export: a SmolVLM2 checkpoint -> an artifact folder (one module per format: gguf.py, mlx.py, onnx.py, coreml.py).

Every exporter writes into pocketvlm.manifest.atomic_output() and writes the manifest last.
"""
