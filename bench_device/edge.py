"""The edge leg: each artifact measured by bench_device.worker in its own subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def measure(artifact: Path, *, images: list[Path], question: str, runs: int, warmup: int, max_tokens: int,
            threads: int | None = None, image_size: int | None = None, on_run=None) -> dict:
    """Run the worker; returns {"variant": {...}, "runs": [...]} or {"variant": {...,"error": msg}, "runs": []}."""
    spec = {"artifact": str(artifact), "images": [str(p) for p in images], "question": question, "runs": runs,
            "warmup": warmup, "max_tokens": max_tokens, "threads": threads, "image_size": image_size}
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm.bench_device.worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    variant = {"artifact": str(artifact)}
    records = []
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # an engine printing to stdout
        kind = event.pop("event", None)
        if kind == "loaded":
            variant.update(event)
        elif kind == "run":
            records.append(event)
            if on_run:
                on_run(event)
        elif kind == "done":
            variant.update(event)
        elif kind == "error":
            variant["error"] = event["message"]
    stderr = proc.stderr.read()
    proc.wait()
    if proc.returncode != 0 and "error" not in variant:
        last = [line for line in stderr.strip().splitlines() if line.strip()]
        variant["error"] = f"worker failed (exit {proc.returncode}): {last[-1] if last else 'no output'}"
    return {"variant": variant, "runs": records}
