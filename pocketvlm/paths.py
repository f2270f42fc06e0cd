"""Paths a user types: `~` and `~user` expanded the way a shell would, an unknown user as one line."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import PocketVLMError


def user_path(text) -> Path:
    """TEXT as a Path, a leading ~ (your home) or ~user (theirs) expanded; a user this system does not know is a
    PocketVLMError naming it (pathlib raises a bare RuntimeError)."""
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:
        raise PocketVLMError(f"{text}: no user {path.parts[0][1:]!r} on this system, so {path.parts[0]} names no "
                             f"folder") from None


def path_arg(text: str) -> str:
    """An argparse `type` for a path argument: expanded at parse time, an unknown ~user as argparse's one line."""
    try:
        return str(user_path(text))
    except PocketVLMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
