"""Reading the JSON files of a model folder, every failure as one line."""

from __future__ import annotations

import json
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
