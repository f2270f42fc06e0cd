"""What every artifact carries besides its engine's files, whatever the format: the processor files a Processor
reads, the record of where it came from, and the tool versions. Used by every export and quantize stage."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import __version__
from .errors import one_line
from .manifest import sha256_file
from .models import ModelSource

# Everything a Processor (pocketvlm.prompt) reads, carried into artifacts that keep the Hugging Face layout.
PROCESSOR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "special_tokens_map.json")


def source_record(src: ModelSource) -> dict:
    """What the manifest says about where an artifact came from: enough to find the reference again."""
    weights = next((src.path / w for w in ("model.safetensors", "model.safetensors.index.json")
                    if (src.path / w).is_file()), None)
    return {"id": src.id, "revision": src.revision, "path": str(src.path),
            "sha256": sha256_file(weights) if weights else None}


def copy_processor_files(src: Path, dst: Path) -> None:
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def base_tools() -> dict:
    return {"pocketvlm": __version__}


def note(progress: bool, message: str) -> None:
    """A progress line of a long export or quantize step (silent with --quiet)."""
    if progress:
        print(f"pocketvlm: {message}", file=sys.stderr, flush=True)


def set_image_size(folder: Path, image_size: int | None) -> dict:
    """Write the image budget (the longest edge images and video frames are resized to before tiling) into the
    artifact's preprocessor_config.json, where every consumer reads it -- our backends, mlx-vlm's load,
    transformers.js -- so all of them tile the same way. Returns the manifest's record of it ({} if unchanged)."""
    if image_size is None:
        return {}
    from .prompt import check_image_size

    check_image_size(image_size)
    # the image processor's settings live in preprocessor_config.json and, in folders a transformers 5 processor
    # saved (mlx-vlm's converter does), again inside processor_config.json -- which AutoProcessor then prefers
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        config = data.get(key) if key else data
        if not isinstance(config, dict):
            continue
        config["size"] = {**(config.get("size") or {}), "longest_edge": image_size}
        sampling = config.get("video_sampling")
        if isinstance(sampling, dict):  # transformers' video processor sizes frames by `size` too; keep in step
            sampling["video_size"] = {**(sampling.get("video_size") or {}), "longest_edge": image_size}
        path.write_text(json.dumps(data, indent=2) + "\n")
    return {"image_size": image_size}


def inherited(manifest: dict) -> dict:
    """What a quantized artifact keeps from the one it was made from (its processor files come along as they are)."""
    return {"image_size": manifest["image_size"]} if isinstance(manifest.get("image_size"), int) else {}


# ------------------------------------------------------------------------------------ a step in its own process

CHILD_RESULT = "pocketvlm-step-result: "
CHILD_ERROR = "pocketvlm: error: "


def run_step(module: str, function: str, kwargs: dict, *, progress: bool, what: str):
    """Call MODULE.FUNCTION(**kwargs, progress=progress) in a fresh Python process and return its (JSON) result.

    For an export step that loads a whole checkpoint (the transformers model in fp32, a traced program): when the
    process ends, all of that memory goes back to the system. In-process it does not: after the ONNX trace at the
    500M shape, 2.3 GB stayed resident through gc.collect(), torch._dynamo.reset() and malloc_trim, and the
    quantization that follows added its own peak on top. Progress lines pass through (unless quiet); a user error
    in the step stays a one-line PocketVLMError; anything else is a bug and says so with the step's last lines."""
    import os
    import subprocess

    from .errors import PocketVLMError

    import threading

    payload = json.dumps({"module": module, "function": function, "kwargs": kwargs, "progress": progress})
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm.artifact", payload], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    tail: list[str] = []
    for line in proc.stderr:
        tail = (tail + [line.rstrip("\n")])[-40:]
        if progress and not line.startswith(CHILD_ERROR):
            print(line, end="", file=sys.stderr, flush=True)
    code = proc.wait()
    reader.join()
    error = next((line[len(CHILD_ERROR):] for line in reversed(tail) if line.startswith(CHILD_ERROR)), None)
    if code == 2 and error:
        if not progress and os.environ.get("POCKETVLM_DEBUG", "").strip() not in ("", "0"):
            print("\n".join(line for line in tail if not line.startswith(CHILD_ERROR)), file=sys.stderr)
        raise PocketVLMError(error)
    result = next((line[len(CHILD_RESULT):] for line in reversed("".join(out).splitlines())
                   if line.startswith(CHILD_RESULT)), None)
    if code != 0 or result is None:
        detail = "\n".join(tail[-8:]) or f"exit {code}"
        raise RuntimeError(f"{what} failed in its subprocess (exit {code}):\n{detail}")
    return json.loads(result)


def _step_main(payload: str) -> int:
    import importlib
    import os

    from .errors import PocketVLMError

    spec = json.loads(payload)
    fn = getattr(importlib.import_module(spec["module"]), spec["function"])
    try:
        result = fn(**spec["kwargs"], progress=spec["progress"])
    except PocketVLMError as e:
        if os.environ.get("POCKETVLM_DEBUG", "").strip() not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(CHILD_ERROR + one_line(e), file=sys.stderr, flush=True)
        return 2
    print(CHILD_RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_step_main(sys.argv[1]))
