"""Model sources: a Hub id (the Hugging Face cache first, offline-aware) or a local Hugging Face SmolVLM folder."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError
from .jsonfile import read_json
from .manifest import read_manifest
from .paths import user_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# What a SmolVLM folder needs; the Hub download asks for no more than this.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


@dataclass(frozen=True)
class ModelSource:
    path: Path           # local folder in the Hugging Face layout
    id: str              # what the user named: Hub id or folder
    revision: str | None  # Hub commit, when it came from the Hub


def resolve_source(source: str, revision: str | None = None, *, local_only: bool = False) -> ModelSource:
    """A local SmolVLM folder, or a Hub id fetched (or found in the cache) via huggingface_hub; with local_only,
    only a folder or the cache (never a request)."""
    path = user_path(source)
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is a file; a model source is a folder in the Hugging Face layout or a Hub id")
        check_smolvlm_dir(path)
        return ModelSource(path=path.resolve(), id=str(path), revision=None)
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise SourceError(f"{source}: no such folder, and not a Hugging Face Hub id (owner/name)")
    local = _hub_snapshot(source, revision, local_only=local_only)
    check_smolvlm_dir(local)
    return ModelSource(path=local, id=source, revision=local.name)


def _hub_snapshot(repo_id: str, revision: str | None, *, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:  # the cache first: works offline, and costs no request
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    hint = (f"download it on a connected machine (`hf download {repo_id}`) and copy the folder or the cache "
            f"({HF_HUB_CACHE}), or pass a local folder")
    if offline or local_only:
        raise SourceError(f"{repo_id} is not in the Hugging Face cache"
                          f"{' and HF_HUB_OFFLINE is set' if offline else ''}; {hint}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # no network, DNS failure, 404, auth: all end the same way for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise SourceError(f"cannot fetch {repo_id} from the Hugging Face Hub (offline or unreachable: {reason}); "
                          f"{hint}") from e


def check_smolvlm_dir(path: Path) -> dict:
    """Refuse, in one line, a folder that is not a complete SmolVLM checkpoint. Returns its config."""
    path = Path(path)
    what = "not a SmolVLM model folder"
    manifest = read_manifest(path)
    if manifest and manifest.get("format") != "hf":
        raise SourceError(f"{path} is a pocketvlm {manifest.get('format')} artifact, not a Hugging Face model folder")
    config = read_json(path / "config.json", what)
    if config.get("model_type") != "smolvlm":
        raise SourceError(f"{path}: model_type is {config.get('model_type')!r}, not 'smolvlm'; {what}")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise SourceError(f"{path}: no {name}; {what} (incomplete download?)")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise SourceError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)}); {what} (incomplete download?)")
    return config
