"""What pocketvlm's backend layer costs: the same artifact through our Backend and through its engine's own
high-level API, side by side in one process, as ratios (a benchmark, not a test).

    python -m pocketvlm.bench_device.overhead ARTIFACT [--image IMG] [--max-tokens 64] [--runs 3]

Goals (docs/ARCHITECTURE.md): decode >= 0.97x the engine's own, TTFT <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def engine_mlx(artifact: Path, image_path: Path, question: str, max_tokens: int) -> dict:
    """mlx-vlm's own stream_generate on the same folder (its processor, its loop)."""
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    if not hasattr(engine_mlx, "cached"):
        engine_mlx.cached = load(str(artifact))
    model, processor = engine_mlx.cached
    prompt = apply_chat_template(processor, model.config, question, num_images=1)
    start = time.perf_counter()
    first = last = None
    n = 0
    for result in stream_generate(model, processor, prompt, image=[str(image_path)], max_tokens=max_tokens,
                                  temperature=0.0):
        now = time.perf_counter()
        first = first or now
        last = now
        n = result.generation_tokens
    return {"ttft_s": first - start, "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else None,
            "tokens": n}


def engine_gguf(artifact: Path, image_path: Path, question: str, max_tokens: int) -> dict:
    """llama-cpp-python's own high-level chat API (Llama + MTMDChatHandler) on the same two files.

    Its prompt differs slightly from SmolVLM2's (the generic handler renders "User: " with a space): the
    comparison is of speed, not of tokens."""
    import base64

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from pocketvlm.manifest import read_manifest
    from pocketvlm.formats.gguf import artifact_files
    from pocketvlm.formats.llama_log import default_threads

    if not hasattr(engine_gguf, "cached"):
        model, mmproj = artifact_files(artifact, read_manifest(artifact))
        handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False)
        engine_gguf.cached = Llama(model_path=str(model), chat_handler=handler, n_ctx=4096,
                                   n_threads=default_threads(), verbose=False)
    llm = engine_gguf.cached
    llm.reset()
    url = "data:image/png;base64," + base64.b64encode(Path(image_path).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    start = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                            repeat_penalty=1.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return {"ttft_s": (first or time.perf_counter()) - start,
            "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else None, "tokens": max(n, 2)}


ENGINES = {"mlx": engine_mlx, "gguf": engine_gguf}


def measure(artifact: Path, image_path: Path, question: str, max_tokens: int, runs: int) -> dict:
    from pocketvlm.manifest import read_manifest
    from pocketvlm.media import open_image
    from pocketvlm.prompt import Request
    from pocketvlm.runtime import open_backend

    fmt = (read_manifest(artifact) or {}).get("format")
    if fmt not in ENGINES:
        raise SystemExit(f"no direct-engine comparison for format {fmt!r} (have: {', '.join(ENGINES)})")
    backend = open_backend(artifact, torch_free=True)
    request = Request(question, images=[open_image(image_path)])
    engine = ENGINES[fmt]
    ours, theirs = [], []
    engine(artifact, image_path, question, max_tokens)  # warm both
    backend.run(request, max_tokens, ignore_eos=True)
    for _ in range(runs):  # interleaved, so drift in machine load hits both alike
        direct = engine(artifact, image_path, question, max_tokens)
        theirs.append(direct)
        # the same number of tokens the engine produced (it stops at end of sequence; we must not run longer)
        t = backend.run(request, direct["tokens"], ignore_eos=True).timings
        ours.append({"ttft_s": t.ttft_s, "decode_tok_s": t.decode_tok_s})

    def med(rows, key):
        values = [r[key] for r in rows if r[key]]
        return statistics.median(values) if values else None

    out = {"artifact": str(artifact), "format": fmt, "runs": runs,
           "ours": {k: med(ours, k) for k in ("ttft_s", "decode_tok_s")},
           "engine": {k: med(theirs, k) for k in ("ttft_s", "decode_tok_s")}}
    if out["ours"]["decode_tok_s"] and out["engine"]["decode_tok_s"]:
        out["decode_ratio"] = out["ours"]["decode_tok_s"] / out["engine"]["decode_tok_s"]
    out["ttft_ratio"] = out["ours"]["ttft_s"] / out["engine"]["ttft_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--image", type=Path, default=None, help="image to ask about (default: a drawn probe image)")
    p.add_argument("--question", default="Describe this image.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    image = args.image
    if image is None:
        import tempfile

        from pocketvlm.evaluate import builtin_samples

        image = Path(tempfile.mkdtemp()) / "probe.png"
        builtin_samples()[0].request.images[0].save(image)
    try:
        print(json.dumps(measure(args.artifact, image, args.question, args.max_tokens, args.runs), indent=2))
    finally:
        _release_engines()
    return 0


def _release_engines() -> None:
    """Close the engines while the interpreter is whole: llama-cpp-python's Llama.__del__ at shutdown otherwise
    prints a traceback (its stderr redirect is already closed)."""
    for engine in ENGINES.values():
        cached = getattr(engine, "cached", None)
        close = getattr(cached, "close", None)
        if callable(close):
            close()
        if cached is not None:
            del engine.cached


if __name__ == "__main__":
    sys.exit(main())
