"""pocketvlm.json, the manifest every output folder carries, and the atomic-output rule that writes it last.

A folder is only ever seen complete: it is built as OUT.partial-<random>/, the manifest (sizes + sha256 of every
file) is written last, and the folder is renamed into place. Readers refuse a folder without a manifest, or
whose files do not match it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from .errors import ArtifactError, PocketVLMError

FILENAME = "pocketvlm.json"
SCHEMA = 1
# Hashing a 2.2B model's 4.5 GB takes ~4 s; files this large are re-hashed only when their size, mtime or inode
# changed since they last verified (a per-user cache, like make's and rsync's quick check).
HASH_CACHE_MIN_BYTES = 64 << 20


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listed_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != FILENAME)


def write_manifest(root: Path, *, format: str, quant: str, source: dict, tools: dict, **extra) -> dict:
    """Hash every file under root and write root/pocketvlm.json. Call it as the last step of building root."""
    root = Path(root)
    files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _listed_files(root)]
    manifest = {
        "schema": SCHEMA,
        "format": format,
        "quant": quant,
        "source": source,
        "files": files,
        "tools": tools,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    tmp = root / (FILENAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / FILENAME)
    return manifest


def read_manifest(root: Path) -> dict | None:
    """The parsed manifest, or None if the folder has none. A manifest that cannot be read is an error."""
    path = Path(root) / FILENAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e.__class__.__name__}); re-export the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "files" not in manifest:
        raise ArtifactError(f"{path}: not a pocketvlm manifest of schema {SCHEMA}; re-export the artifact")
    return manifest


def verify(root: Path, manifest: dict, *, hashes: bool = True) -> None:
    """Check every listed file exists with its size (and, by default, its sha256)."""
    root = Path(root)
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            raise ArtifactError(f"{root}: {entry['path']} is missing (listed in {FILENAME}); re-export the artifact")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{root}: {entry['path']} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']}; the artifact is corrupt or was changed")
        if hashes and sha256_quick(path) != entry["sha256"]:
            raise ArtifactError(f"{root}: {entry['path']} does not match its sha256 in {FILENAME}; "
                                f"the artifact is corrupt or was changed")


def _hash_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocketvlm" / "sha256-cache.json"


def sha256_quick(path: Path) -> str:
    st = path.stat()
    if st.st_size < HASH_CACHE_MIN_BYTES:
        return sha256_file(path)
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path.resolve()}|")}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(dict(list(cache.items())[-1000:])))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs the next run a re-hash
    return digest


def refuse_existing(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PocketVLMError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PocketVLMError(f"{out} already exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False):
    """Yield a scratch folder beside OUT; on success (manifest written) rename it to OUT, on failure delete it.

    With force, a previous OUT is replaced only once the new one is complete, so a failed run loses nothing.
    """
    out = Path(out)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f"{out.name}.partial-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        yield scratch
        if not (scratch / FILENAME).is_file():
            raise RuntimeError(f"bug: {scratch} finished without {FILENAME}")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        out.rename(old)
        scratch.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        scratch.rename(out)
