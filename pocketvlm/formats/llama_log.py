"""llama.cpp's log (llama.cpp, ggml and mtmd messages), captured instead of printed: the recent lines explain a
failure in one line, a capture collects one operation's log (the quantizer's per-tensor report), and
POCKETVLM_LLAMA_LOG=1 shows it all. Shared by quantize/gguf.py and runtime/gguf.py; imports llama_cpp only when
installed into a process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections import deque


class _EngineLog:
    """llama.cpp / ggml / mtmd log lines go here instead of the terminal (POCKETVLM_LLAMA_LOG=1 shows them):
    the recent ones explain a failure in one line; captures collect a whole operation's log (the quantizer's
    per-tensor report)."""

    def __init__(self):
        self.recent: deque[tuple[int, str]] = deque(maxlen=400)
        self.captures: list[list[str]] = []
        self.lock = threading.Lock()
        self.installed = False
        self._callback = None

    def install(self) -> None:
        if self.installed:
            return
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        show = os.environ.get("POCKETVLM_LLAMA_LOG", "").strip() not in ("", "0")

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            message = text.decode("utf-8", "replace") if text else ""
            with self.lock:
                self.recent.append((level, message))
                for capture in self.captures:
                    capture.append(message)
            if show:
                sys.stderr.write(message)

        self._callback = callback  # keep the C function pointer alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
            if hasattr(mtmd, setter):
                getattr(mtmd, setter)(callback, ctypes.c_void_p(0))
        self.installed = True

    def errors(self, limit: int = 1) -> str:
        """The last error-level message(s), one line."""
        with self.lock:
            lines = [m.strip() for level, m in self.recent if level == 3 and m.strip()]
        text = " ".join(lines[-limit:])
        return " ".join(text.split())[:300]

    def clear(self) -> None:
        with self.lock:
            self.recent.clear()

    @contextlib.contextmanager
    def capture(self):
        """Collect every log message emitted inside the block."""
        lines: list[str] = []
        with self.lock:
            self.captures.append(lines)
        try:
            yield lines
        finally:
            with self.lock:
                self.captures.remove(lines)


ENGINE_LOG = _EngineLog()


def engine_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def default_threads() -> int:
    """llama.cpp's thread count when none is given: every core this process may use."""
    from pocketvlm.threads import cpu_count

    return cpu_count()
