"""Ctrl-C, SIGTERM and SIGHUP as exceptions that unwind (so a half-built OUT.partial-* folder is removed on the way
out), and that a long loop cannot lose.

Python raises a signal's exception wherever the main thread happens to be. Raised inside a finaliser (a __del__ or
a weakref callback, which the garbage collector runs at any point -- every training step frees thousands of
tensors), it is printed as "Exception ignored" and dropped: a fine-tune went on training for minutes after Ctrl-C
under the test suite, and a make-model stopped by SIGTERM finished and exited 0. So the handler also records the
signal, and check() raises it again: long loops call it once per step, atomic_output before it renames a finished
folder into place (a stopped run never commits its output), and the CLI before it exits.
"""

from __future__ import annotations

import signal

_pending: int | None = None


def _exception(signum: int) -> BaseException:
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)  # SystemExit unwinds like an exception; the shell's 128 + N exit status


def _handle(signum, frame):
    global _pending
    _pending = signum
    raise _exception(signum)


def install() -> None:
    """Handle SIGINT (unless it was ignored when the process started, as for a background job), SIGTERM, SIGHUP."""
    global _pending
    _pending = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    if hasattr(signal, "SIGHUP"):  # a closed terminal cleans up like a kill
        signal.signal(signal.SIGHUP, _handle)


def check() -> None:
    """Raise the signal's exception again if one arrived (its first raise may have been swallowed)."""
    if _pending is not None:
        raise _exception(_pending)


def clear() -> None:
    """Forget a signal the caller has handled (serve stops on Ctrl-C as its way to end, status 0)."""
    global _pending
    _pending = None
