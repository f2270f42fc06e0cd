"""Reading the JSON files of a model folder, every failure as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import SourceError


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise SourceError(f"{path.parent}: no {path.name}; {what}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: unreadable JSON ({e.__class__.__name__}); {what}") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object; {what}")
    return data


def finite(value):
    """VALUE with every NaN or infinite float (which JSON cannot hold) made None: unknown, not a number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, indent: int | None = 2) -> str:
    """JSON text of VALUE as every pocketvlm output writes it: standard JSON (no bare NaN / Infinity, which
    Python's json writes by default and other readers refuse)."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)
