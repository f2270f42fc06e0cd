"""pocketvlm.json, the manifest every output folder carries, and the atomic-output rule that writes it last.

A folder is only ever seen complete: it is built as OUT.partial-<random>/, the manifest (sizes + sha256 of every
file) is written last, and the folder is renamed into place. Readers refuse a folder without a manifest, or
whose files do not match it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from . import interrupts
from .errors import ArtifactError, PocketVLMError
from .jsonfile import dumps

FILENAME = "pocketvlm.json"
SCHEMA = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
PARTIAL = ".partial-"  # + 8 hex digits: the scratch folder beside OUT
# How an artifact's files are checked on open: "full" (default) hashes every byte, so any change is caught;
# "sizes" (POCKETVLM_VERIFY=sizes, opt-in) checks names and sizes only and does NOT notice changed bytes.
VERIFY_ENV = "POCKETVLM_VERIFY"


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
    tmp.write_text(dumps(manifest) + "\n")
    os.replace(tmp, root / FILENAME)
    return manifest


def read_manifest(root: Path) -> dict | None:
    """The parsed manifest, or None if the folder has none. A manifest that cannot be read, or whose file list is
    malformed, is a one-line error."""
    path = Path(root) / FILENAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e.__class__.__name__}); re-export the artifact") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "files" not in manifest:
        raise ArtifactError(f"{path}: not a pocketvlm manifest of schema {SCHEMA}; re-export the artifact")
    problem = _files_problem(manifest["files"])
    if problem:
        raise ArtifactError(f"{path}: malformed file list ({problem}); re-export the artifact")
    if not isinstance(manifest.get("format"), str) or not isinstance(manifest.get("quant"), str):
        raise ArtifactError(f"{path}: malformed manifest (format and quant must be strings); re-export the artifact")
    return manifest


def _files_problem(files) -> str | None:
    """Why a manifest's `files` is unusable, or None: a non-empty list of {path, bytes, sha256}, each path relative
    and inside the folder (no '..', no absolute path, no backslash), listed once."""
    if not isinstance(files, list):
        return f"'files' is {type(files).__name__}, not a list"
    if not files:
        return "it lists no files"
    seen = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            return f"entry {i} is {type(entry).__name__}, not an object"
        path, size, digest = entry.get("path"), entry.get("bytes"), entry.get("sha256")
        if not isinstance(path, str) or not path:
            return f"entry {i} has no path"
        parts = path.split("/")
        if path.startswith("/") or "\\" in path or ".." in parts or "" in parts or "." in parts or "\0" in path:
            return f"entry {i}: {path!r} is not a plain relative path inside the folder"
        if path == FILENAME or path in seen:
            return f"entry {i}: {path!r} listed twice or is the manifest itself"
        seen.add(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"entry {i} ({path}) has no byte count"
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            return f"entry {i} ({path}) has no sha256"
    return None


def verify(root: Path, manifest: dict, *, hashes: bool | None = None) -> None:
    """Check the folder holds exactly the listed files, each a file inside the folder (no symlink out of it) with
    its size and, unless POCKETVLM_VERIFY=sizes (or hashes=False), its sha256 over every byte."""
    root = Path(root)
    if hashes is None:
        hashes = os.environ.get(VERIFY_ENV, "full").strip().lower() != "sizes"
    real_root = root.resolve()
    listed = set()
    for entry in manifest["files"]:
        path = root / entry["path"]
        listed.add(entry["path"])
        if not path.resolve().is_relative_to(real_root):  # a symlink out (one that stays inside is fine)
            raise ArtifactError(f"{root}: {entry['path']} is a link out of the artifact folder; refusing it")
        if not path.is_file():
            raise ArtifactError(f"{root}: {entry['path']} is missing (listed in {FILENAME}); re-export the artifact")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{root}: {entry['path']} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']}; the artifact is corrupt or was changed")
    extra = sorted(p.relative_to(root).as_posix() for p in _listed_files(root)
                   if p.relative_to(root).as_posix() not in listed)
    if extra:
        raise ArtifactError(f"{root}: {extra[0]} is not listed in {FILENAME}"
                            + (f" (nor {len(extra) - 1} more)" if len(extra) > 1 else "")
                            + "; the artifact was changed: remove what was added, or re-export it")
    if hashes:
        for entry in manifest["files"]:
            if sha256_file(root / entry["path"]) != entry["sha256"]:
                raise ArtifactError(f"{root}: {entry['path']} does not match its sha256 in {FILENAME}; "
                                    f"the artifact is corrupt or was changed")


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _is_pocketvlm_output(folder: Path) -> bool:
    try:
        return read_manifest(folder) is not None
    except ArtifactError:
        return True  # our manifest, damaged: still a folder we wrote


def check_output(out: Path, *, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """Refuse, in one line and before any work, an OUT that writing (or --force replacing) could hurt: the
    filesystem root, the home folder, the working directory or one of its ancestors, a folder in `protect` (the
    source being read), one of their ancestors or a folder inside them, a non-empty folder without --force, and
    with --force anything that is not an earlier pocketvlm output or an empty folder. Also an OUT whose parent is a
    file or whose scratch name would be too long."""
    out = Path(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        what = "the filesystem root" if target == Path(target.anchor) else "your home folder"
        raise PocketVLMError(f"--out {out} is {what}; choose a new folder for the output")
    if cwd == target or cwd.is_relative_to(target):
        raise PocketVLMError(f"--out {out} is the working directory{'' if cwd == target else ' or holds it'}; "
                             f"choose a new folder for the output")
    for source in protect:
        source = Path(source).resolve()
        if source == target or source.is_relative_to(target):
            raise PocketVLMError(f"--out {out} is the source ({source}){'' if source == target else ' or holds it'}; "
                                 f"choose another folder")
        if target.is_relative_to(source):
            raise PocketVLMError(f"--out {out} is inside the source {source}; writing there would change the source "
                                 f"(and its manifest would no longer match); choose a folder outside it")
    existing = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), Path("."))
    if existing != out and not existing.is_dir():
        raise PocketVLMError(f"--out {out}: {existing} is a file, not a folder")
    if len(out.name) + len(PARTIAL) + 8 > name_max(existing if existing.is_dir() else existing.parent):
        raise PocketVLMError(f"--out {out}: the folder name is too long ({len(out.name)} characters; at most "
                             f"{name_max(existing) - len(PARTIAL) - 8} here)")
    if out.is_symlink():
        raise PocketVLMError(f"--out {out} is a symbolic link; point --out at a real folder")
    if out.exists() and not out.is_dir():
        raise PocketVLMError(f"{out} exists and is not a directory")
    problem = _why_not_replaceable(out, force=force) if out.is_dir() else None
    if problem:
        raise PocketVLMError(problem)


def _why_not_replaceable(folder: Path, *, force: bool, name: Path | None = None) -> str | None:
    """Why writing over FOLDER (an existing directory, shown as NAME) is refused, or None: a non-empty folder
    without --force, and with --force anything but an earlier pocketvlm output."""
    name = name or folder
    try:
        empty = not any(folder.iterdir())
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or e})"
    if empty:
        return None
    if not force:
        return f"{name} already exists and is not empty; pass --force to replace it"
    if not _is_pocketvlm_output(folder):
        return (f"{name} is not a pocketvlm output (no {FILENAME}) and not empty: --force only replaces earlier "
                f"pocketvlm outputs or empty folders; remove it yourself or choose another --out")
    return None


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool = False, protect: tuple[Path, ...] = ()):
    """Yield a scratch folder beside OUT; on success (manifest written) rename it to OUT, on failure delete it.

    OUT is checked (check_output) before the work and again, by the same rules, just before the rename: a folder
    that appeared at OUT while this ran, or changed, is never replaced unless the rules allow it. With force, a
    previous OUT (an earlier pocketvlm output) is replaced only once the new one is complete, so a failed run loses
    nothing.
    """
    out = Path(out)
    check_output(out, force=force, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_abandoned(out)
        scratch = out.parent / f"{out.name}{PARTIAL}{secrets.token_hex(4)}"
        scratch.mkdir()
        # held while this process builds it; the system drops the lock however the process ends (kill -9, the
        # out-of-memory killer), which is how sweep_abandoned tells an abandoned folder from one being built.
        # None (no flock here): not held, and a sweep, unable to lock it either, leaves it alone
        held = _locked(scratch)
    except OSError as e:
        raise PocketVLMError(f"cannot create the output folder beside {out} ({e.strerror or e})") from e
    try:
        try:
            yield scratch
            if not (scratch / FILENAME).is_file():
                raise RuntimeError(f"bug: {scratch} finished without {FILENAME}")
            interrupts.check()  # a stop signal whose exception a finaliser swallowed: do not commit
            _move_into_place(scratch, out, force=force, protect=protect)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    finally:
        if held is not None:
            os.close(held)  # after the rename: a sweep never sees this folder unlocked while it is a scratch


def _locked(path: Path, flags: int = 0) -> int | None:
    """A descriptor of PATH (opened read-only | FLAGS) holding an exclusive flock on it, taken without waiting; None
    if there is no flock here, PATH cannot be opened so, or another process holds the lock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_abandoned(out: Path) -> list[Path]:
    """Remove OUT's scratch folders (OUT.partial-<8 hex>, real folders, not links) that no process holds: left by a
    run killed without a chance to clean up, at 2.2B several GB each. One being built is locked and kept; a folder
    of any other name is never touched. Returns what was removed."""
    name = re.compile(re.escape(out.name + PARTIAL) + "[0-9a-f]{8}")
    try:
        candidates = [p for p in out.parent.iterdir() if name.fullmatch(p.name)]
    except OSError:
        return []
    removed = []
    for path in candidates:
        fd = _locked(path, getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        if fd is None:  # being built (locked), a file or a link, gone already, or no flock here
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:  # not renamed and replaced
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:  # gone meanwhile
            pass
        finally:
            os.close(fd)
    if removed:
        print(f"pocketvlm: removed {len(removed)} scratch folder(s) of {out} left by a killed run", file=sys.stderr)
    return removed


def _move_into_place(scratch: Path, out: Path, *, force: bool, protect: tuple[Path, ...]) -> None:
    """Rename the finished SCRATCH to OUT, by the rules check_output applied before the work, applied again now:
    OUT may have appeared, or changed, while this ran. A previous OUT is first moved aside and checked again there
    (nothing can be added to it under its new name), so what is deleted is only ever what the rules allow; the
    final rename of a folder can only replace an empty folder (rename(2)), never files."""
    try:
        check_output(out, force=force, protect=protect)
    except PocketVLMError as e:
        raise PocketVLMError(f"--out {out} changed while this ran: {e}; it was left as it is and this run's output "
                             f"was discarded") from e
    try:
        if out.exists():
            old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
            out.rename(old)
            problem = _why_not_replaceable(old, force=force, name=out)
            if problem:
                old.rename(out)  # written to in the instant since the check: put it back as it is
                raise PocketVLMError(f"--out {out} changed while this ran: {problem}; it was left as it is and this "
                                     f"run's output was discarded")
            try:
                scratch.rename(out)
            except OSError:
                with contextlib.suppress(OSError):
                    old.rename(out)  # put the previous output back (unless something took its place meanwhile)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            scratch.rename(out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise PocketVLMError(f"--out {out} appeared while this ran; it was left as it is and this run's output "
                                 f"was discarded") from e
        what = "it is in use (a mount point or busy)" if e.errno == errno.EBUSY else (e.strerror or str(e))
        raise PocketVLMError(f"cannot move the finished output into {out}: {what}; nothing was changed") from e
