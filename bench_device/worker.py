"""One artifact's edge measurements, in a process of its own so memory figures do not mix.

Run by bench_device.edge as `python -m pocketvlm.bench_device.worker SPEC_JSON`; prints one JSON object per line:
{"event": "loaded", ...}, {"event": "run", ...} per measured run, then {"event": "done", ...}; a user error is
{"event": "error", "message": ...}.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from pocketvlm.jsonfile import dumps


def _emit(**event):
    print(dumps(event, indent=None), flush=True)


def _peak_rss_bytes() -> int:
    # Linux: VmHWM is this program's own high-water mark (ru_maxrss would carry the parent's across fork+exec).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _size_on_disk(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(spec: dict) -> int:
    from pocketvlm.errors import PocketVLMError
    from pocketvlm.media import open_image
    from pocketvlm.prompt import Request
    from pocketvlm.runtime import open_backend

    try:
        images = [(Path(p).name, open_image(p)) for p in spec["images"]]
        start = time.perf_counter()
        backend = open_backend(spec["artifact"], threads=spec.get("threads"), torch_free=True,
                               image_size=spec.get("image_size"))
        open_s = time.perf_counter() - start
    except PocketVLMError as e:
        _emit(event="error", message=str(e))
        return 2
    info = backend.describe()
    _emit(event="loaded", backend=backend.name, quant=backend.quant, load_s=backend.load_s, open_s=open_s,
          image_size=backend.processor.config.longest_edge,
          size_bytes=_size_on_disk(Path(spec["artifact"])), describe=info,
          decode_weight_bytes=info.get("decode_weight_bytes"), rss_after_load_bytes=_peak_rss_bytes(),
          torch_loaded=sys.modules.get("torch") is not None)
    question, max_tokens = spec["question"], spec["max_tokens"]
    for _ in range(spec["warmup"]):
        backend.run(Request(question, images=[images[0][1]]), max_tokens, ignore_eos=True)
    for name, image in images:
        for run in range(spec["runs"]):
            result = backend.run(Request(question, images=[image]), max_tokens, ignore_eos=True)
            t = result.timings
            _emit(event="run", image=name, run=run, encode_s=t.encode_s, ttft_s=t.ttft_s,
                  prefill_tok_s=t.prefill_tok_s, decode_tok_s=t.decode_tok_s, e2e_s=t.total_s,
                  prompt_tokens=result.prompt_tokens, generated_tokens=len(result.token_ids),
                  image_tiles=result.image_tiles, image_tokens=result.image_tokens,
                  **({"token_ids": result.token_ids} if run == 0 else {}))
    _emit(event="done", peak_rss_bytes=_peak_rss_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
