"""Steps for tests/test_run_step.py's run_step tests, imported by run_step's child process (never by pytest)."""

from __future__ import annotations

import os
import signal
import sys

from pocketvlm.errors import PocketVLMError


def echo(value, *, progress: bool):
    if progress:
        print("echo: working", file=sys.stderr, flush=True)
    return {"value": value}


def user_error(*, progress: bool):
    print("a progress line before the error", file=sys.stderr, flush=True)
    raise PocketVLMError("the model folder has no weights;\n   re-download it")


def crash(how: str, *, progress: bool):
    if how == "exception":
        return 1 / 0
    if how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    sys.stdout.flush()
    os._exit(0)  # "exit": ends without a result
