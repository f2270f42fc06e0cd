"""What opening an artifact costs for its integrity check: the full sha256 of every byte (the default) against
POCKETVLM_VERIFY=sizes (names and sizes only), per artifact.

    python -m pocketvlm.bench_device.verify_cost ARTIFACT... [--repeat 3] [--json FILE]

Each ARTIFACT is any folder with a pocketvlm.json (an export, a quantized artifact, a make-model folder). Per
artifact: its size, the first full check (the page cache may be cold), the median of --repeat more (warm), the
sizes-only check, and the hashing rate. The load average is printed before and after: hashing is one core's work,
so a busy machine slows it. A benchmark, not a test; docs/BENCH.md keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from pocketvlm.errors import PocketVLMError
from pocketvlm.manifest import read_manifest, verify


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(artifact: Path, repeat: int = 3) -> dict:
    manifest = read_manifest(artifact)
    if manifest is None:
        raise PocketVLMError(f"{artifact}: no pocketvlm.json; pass an artifact folder")
    size = sum(int(f["bytes"]) for f in manifest["files"])
    first = _timed(lambda: verify(artifact, manifest, hashes=True))
    warm = [_timed(lambda: verify(artifact, manifest, hashes=True)) for _ in range(repeat)]
    sizes = statistics.median(_timed(lambda: verify(artifact, manifest, hashes=False)) for _ in range(repeat))
    median = statistics.median(warm)
    return {"artifact": str(artifact), "format": manifest.get("format"), "quant": manifest.get("quant"),
            "bytes": size, "files": len(manifest["files"]), "full_first_s": first, "full_warm_s": median,
            "sizes_s": sizes, "mb_per_s": size / 1e6 / median if median else None}


def render(rows: list[dict], load_before: str, load_after: str) -> str:
    lines = [f"load average before {load_before}, after {load_after}", "",
             "| artifact | format/quant | size | files | full sha256, first | full, warm (median) | sizes only | rate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['artifact']).name} | {r['format']}/{r['quant']} | {r['bytes'] / 1e6:.0f} MB | "
                     f"{r['files']} | {r['full_first_s']:.2f} s | {r['full_warm_s']:.2f} s | "
                     f"{1000 * r['sizes_s']:.1f} ms | {r['mb_per_s']:.0f} MB/s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketvlm.bench_device.verify_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    parser.add_argument("--repeat", type=int, default=3, help="warm full checks per artifact (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    load = lambda: "/".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        before = load()
        rows = [measure(Path(a), args.repeat) for a in args.artifacts]
        after = load()
    except PocketVLMError as e:
        print(f"pocketvlm: error: {e}", file=sys.stderr)
        return 2
    print(render(rows, before, after))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
