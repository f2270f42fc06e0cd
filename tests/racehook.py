"""Run the pocketvlm command with a folder appearing at OUT while it works -- at the last moment, just before the
finished output is moved into place (the race a user loses by creating the folder, or another run finishing, while
a long command runs). Used as `python tests/racehook.py MODE OUT -- pocketvlm ARGS...`.

MODE: `files` -- OUT appears holding a user's file; `empty` -- OUT appears empty; `swap` -- an earlier pocketvlm
output at OUT is replaced by a user's folder (what --force checked at the start is no longer there).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pocketvlm import manifest
from pocketvlm.cli import main

PRECIOUS = "precious.txt"


def appear(mode: str, out: Path) -> None:
    if mode == "swap":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if mode in ("files", "swap"):
        (out / PRECIOUS).write_text("a user's file\n")


if __name__ == "__main__":
    mode, out, sep, *argv = sys.argv[1:]
    assert sep == "--" and mode in ("files", "empty", "swap"), sys.argv
    original = manifest._move_into_place

    def racing(scratch, target, **kwargs):
        if Path(target).resolve() == Path(out).resolve():
            appear(mode, Path(out))
        return original(scratch, target, **kwargs)

    manifest._move_into_place = racing
    sys.exit(main(argv))
