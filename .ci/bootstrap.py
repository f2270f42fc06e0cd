"""Build (once) or find pocketvlm's Python environment. Standard library only: runs on the machine's python3
before anything is installed, on Linux and macOS alike (no GNU tools, no bash features beyond 3.2 in env.sh).

    python3 .ci/bootstrap.py path      print the environment's folder (computes the key, builds nothing)
    python3 .ci/bootstrap.py ensure    build it unless complete, point it at this checkout, print its folder
    python3 .ci/bootstrap.py dry-run   resolve the whole install in a throw-away venv with pip's cache off,
                                       building every sdist's metadata in isolation (no compile): the cheap
                                       proof that a bare machine can install everything (tests/test_setup.py)

The environment lives in ${POCKETVLM_ENV_ROOT:-~/.cache/pocketvlm}/env-<key>, the key a hash of everything that
decides what gets installed. pip's own output goes to env-<key>.log beside it; the terminal gets what is
happening (and, during the ~10-minute compile of llama.cpp, a heartbeat), and a failure is one line naming the
step and the log. An environment without its .complete marker is half-built and is started over.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci"
CONSTRAINTS = CI / "constraints.txt"
BUILD_CONSTRAINTS = CI / "build-constraints.txt"
DEFAULT_EXTRAS = "dev,mlx,bench,gguf,onnx,coreml,finetune"
MIN_PYTHON = (3, 10)
# the files whose content decides what gets installed: change one and the next run builds a fresh environment
KEY_FILES = ("pyproject.toml", ".ci/constraints.txt", ".ci/build-constraints.txt", ".ci/bootstrap.py", ".ci/env.sh")
HEARTBEAT_S = 30.0
KEEP_OTHER_ENVS = 1  # besides the one in use, the most recently used other environment stays (two branches' specs)
COMPILE_NOTE = "llama-cpp-python compiles llama.cpp from source: about 10 minutes on 2 cores"
INSTALL_HINT = ("install one: apt-get install build-essential cmake (Debian/Ubuntu), "
                "xcode-select --install (macOS)")


class SetupError(Exception):
    """One line for the user: what failed and where the full log is."""


def say(message: str) -> None:
    print(f"pocketvlm: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- key

def extras() -> str:
    value = os.environ.get("POCKETVLM_EXTRAS", DEFAULT_EXTRAS)
    if not re.fullmatch(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", value):
        raise SetupError(f"POCKETVLM_EXTRAS={value!r}: expected comma-separated extra names (e.g. {DEFAULT_EXTRAS})")
    return value


def env_key() -> str:
    digest = hashlib.sha256()
    for name in KEY_FILES:
        path = ROOT / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    digest.update(extras().encode() + b"\0")
    digest.update(f"{platform.python_implementation()} {platform.python_version()} {platform.machine()} "
                  f"{sys.platform}".encode())
    return digest.hexdigest()[:16]


def env_root() -> Path:
    given = os.environ.get("POCKETVLM_ENV_ROOT")
    if given:
        try:
            return Path(given).expanduser()
        except RuntimeError:  # ~user of a user this system does not know
            raise SetupError(f"POCKETVLM_ENV_ROOT={given}: no such user's home folder; give a folder path") from None
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "pocketvlm"


def env_path() -> Path:
    return env_root() / f"env-{env_key()}"


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


# ------------------------------------------------------------------------------------------------ checks

def check_python() -> None:
    if sys.version_info < MIN_PYTHON:
        raise SetupError(f"pocketvlm needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this python3 is "
                         f"{platform.python_version()} ({sys.executable}); install a newer Python or point "
                         f"POCKETVLM_PYTHON at one")
    try:
        import ensurepip  # noqa: F401  (Debian splits it out of python3 into python3-venv)
        import venv  # noqa: F401
    except ImportError:
        raise SetupError(f"this python3 ({sys.executable}) cannot create virtual environments; install its venv "
                         f"module: apt-get install python3-venv (Debian/Ubuntu)") from None


def check_toolchain(wanted: str) -> list[str]:
    """llama-cpp-python (the gguf extra) builds from source: a C and a C++ compiler are required; cmake is not
    (scikit-build-core fetches it from the package index when the machine has none). Returns notes to show."""
    if not {"gguf", "all"} & set(wanted.split(",")):
        return []
    if sys.platform == "darwin":
        ok = subprocess.run(["xcode-select", "-p"], capture_output=True).returncode == 0 if shutil.which(
            "xcode-select") else False
        if not ok:
            raise SetupError("no C/C++ toolchain: llama-cpp-python compiles llama.cpp from source; "
                             "install the command line tools: xcode-select --install")
    c = os.environ.get("CC") or next((t for t in ("cc", "gcc", "clang") if shutil.which(t)), None)
    cxx = os.environ.get("CXX") or next((t for t in ("c++", "g++", "clang++") if shutil.which(t)), None)
    missing = [what for what, tool in (("C", c), ("C++", cxx)) if not tool]
    if missing:
        raise SetupError(f"no {' or '.join(missing)} compiler on PATH: llama-cpp-python compiles llama.cpp from "
                         f"source; {INSTALL_HINT}")
    if not shutil.which("cmake"):
        return ["cmake is not on PATH: the llama.cpp build will fetch it from the package index "
                "(or install it: apt-get install cmake / brew install cmake)"]
    return []


# --------------------------------------------------------------------------------------------------- pip

def install_args(wanted: str, *, editable: bool = True) -> list[str]:
    """The one install command: this checkout with its extras, exact versions, every sdist built in pip's
    isolated build environment from its own declared build requirements (pinned by build-constraints.txt)."""
    target = f"{ROOT}[{wanted}]"
    return ["install", "-c", str(CONSTRAINTS), "--build-constraint", str(BUILD_CONSTRAINTS),
            *(["-e"] if editable else []), target]


def pinned(name: str) -> str:
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if re.match(rf"{re.escape(name)}\s*==", line, re.I):
            return line
    raise SetupError(f"{CONSTRAINTS}: no pin for {name}")


def _is_llama(name: str) -> bool:
    return name.replace("_", "-").lower().startswith("llama-cpp-python")


class Pip:
    """pip runs with its output in the log; the terminal gets the phase, and a heartbeat while it lasts."""

    PHASES = (
        (re.compile(r"^\s*Building wheel for (\S+)"), "building {}"),
        (re.compile(r"^Collecting (\S+)"), "resolving {}"),
        (re.compile(r"^\s*Downloading (\S+)"), "downloading {}"),
        (re.compile(r"^Installing collected packages"), "installing the packages"),
    )
    # lines that name the package pip was working on when a build fails (the last one wins)
    PACKAGE_LINES = (re.compile(r"Failed building wheel for ([\w.\-]+)"),
                     re.compile(r"Failed to build (?!installable)([\w.\-]+)"),
                     re.compile(r"Building wheel for ([\w.\-]+)"),
                     re.compile(r"^Collecting (\S+)", re.M))
    PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\]|\[\s*(\d+)%\]")  # ninja [12/345], make [ 45%]

    def __init__(self, python: Path, log: Path, env: dict | None = None):
        self.python, self.log, self.env = python, log, env

    def run(self, args: list[str], step: str, *, verbose: bool = False) -> None:
        cmd = [str(self.python), "-m", "pip", "--disable-pip-version-check", "--no-input",
               *(["-v"] if verbose else []), *args]
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env)
        watcher = threading.Thread(target=self._heartbeat, args=(proc, start, step), daemon=True)
        watcher.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        watcher.join()
        if code != 0:
            raise SetupError(f"setup failed while {self.diagnose(start, step)}: see {self.log}")

    def _tail(self, start: int) -> list[str]:
        try:
            with open(self.log, errors="replace") as f:
                f.seek(start)
                return f.read().splitlines()
        except OSError:
            return []

    def phase(self, lines: list[str]) -> str | None:
        """What pip is doing now, from the last lines of its log."""
        progress = None
        for line in reversed(lines[-400:]):
            m = self.PROGRESS.search(line)
            if m and progress is None:
                progress = f"{m.group(1)}/{m.group(2)}" if m.group(1) else f"{m.group(3)}%"
            for pattern, label in self.PHASES:
                found = pattern.search(line)
                if found:
                    name = found.group(1) if pattern.groups else ""
                    if label.startswith("building") and _is_llama(name):
                        return "building llama-cpp-python (C++ build of llama.cpp)" + (
                            f", step {progress}" if progress else "")
                    return label.format(name)
        return None

    def _heartbeat(self, proc, start: int, step: str) -> None:
        began, last_note, announced = time.monotonic(), 0.0, False
        tty = sys.stderr.isatty()
        while proc.poll() is None:
            time.sleep(1.0 if tty else 5.0)
            lines = self._tail(start)
            now = self.phase(lines) or step
            if "llama-cpp-python" in now and not announced:
                say(f"{COMPILE_NOTE}; the full log is {self.log}")
                announced = True
            elapsed = time.monotonic() - began
            if tty:
                sys.stderr.write(f"\r\033[Kpocketvlm: {now} ({int(elapsed // 60)}m{int(elapsed % 60):02d}s)")
                sys.stderr.flush()
            elif elapsed - last_note >= HEARTBEAT_S:
                say(f"still {now} ({int(elapsed // 60)}m{int(elapsed % 60):02d}s)")
                last_note = elapsed
        if tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def diagnose(self, start: int, step: str) -> str:
        """The step that failed, in a few words, from pip's log."""
        lines = self._tail(start)
        text = "\n".join(lines)
        if re.search(r"No matching distribution found for|Could not find a version that satisfies", text):
            m = re.search(r"No matching distribution found for (\S+)", text)
            return f"resolving {m.group(1) if m else 'a requirement'} (no matching version on the package index)"
        if "ResolutionImpossible" in text:
            return "resolving the dependencies (conflicting requirements)"
        if re.search(r"Temporary failure in name resolution|Max retries exceeded|Network is unreachable|"
                     r"ConnectionError|Connection refused", text) and not re.search(r"Building wheel for", text):
            return f"{step} (the package index is unreachable)"
        what = step
        found = [(m.start(), m.group(1)) for pattern in self.PACKAGE_LINES for m in pattern.finditer(text)]
        if found and re.search(r"subprocess-exited-with-error|metadata-generation-failed|BackendUnavailable|"
                                  r"Failed building wheel|Failed to build", text):
            name = re.split(r"[=<>!~\[(;, ]", max(found)[1])[0]
            what = f"building {name}" + (" (C++ build)" if _is_llama(name) else "")
        toolchain = re.search(r"No CMAKE_(?:C|CXX)_COMPILER could be found|CMAKE_(?:C|CXX)_COMPILER not set|"
                              r"compiler not found|cmake: not found|No such file or directory: 'cmake'", text)
        if toolchain:
            what += f"; no working compiler or cmake: {INSTALL_HINT}"
        return what


# ------------------------------------------------------------------------------------------------ build

def _lock(env: Path, *, wait: bool = True):
    """One setup per environment at a time (two checkouts may share one). With wait=False: None when another
    setup holds it."""
    try:
        env.parent.mkdir(parents=True, exist_ok=True)
        handle = open(env.parent / f"{env.name}.lock", "w")
    except OSError as e:
        where = "POCKETVLM_ENV_ROOT" if os.environ.get("POCKETVLM_ENV_ROOT") else "the cache folder"
        raise SetupError(f"{where} {env.parent} cannot hold the environment ({e.strerror or e}); point "
                         f"POCKETVLM_ENV_ROOT at a folder you can write") from None
    try:
        import fcntl

        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                handle.close()
                return None
            say(f"another setup is building {env}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
    except ImportError:  # not POSIX: no lock
        pass
    return handle


def last_used(env: Path) -> float:
    """When a setup last used the environment: ensure() touches its marker on every use."""
    for path in (env / ".complete", env):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def prune_others(keep: Path) -> list[str]:
    """Each environment is ~2.5 GB and every change to the dependency spec makes a new one, so after a build the
    root keeps only `keep` and the KEEP_OTHER_ENVS most recently used others. Only folders named env-<key> that
    are virtual environments are touched, and never one whose lock another setup holds. Returns what was removed."""
    others = [p for p in keep.parent.glob("env-*") if p != keep and re.fullmatch(r"env-[0-9a-f]{16}", p.name)
              and p.is_dir() and (p / "pyvenv.cfg").is_file()]
    others.sort(key=last_used, reverse=True)
    removed = []
    for env in others[KEEP_OTHER_ENVS:]:
        handle = _lock(env, wait=False)
        if handle is None:
            continue
        try:
            shutil.rmtree(env, ignore_errors=True)
            (env.parent / f"{env.name}.log").unlink(missing_ok=True)
            removed.append(env.name)
        finally:
            handle.close()
    if removed:
        say(f"removed {len(removed)} older environment(s) no setup has used lately: {', '.join(removed)}")
    return removed


def pip_cache_is_empty(python: Path) -> bool:
    """Whether pip (as configured here: PIP_CACHE_DIR, PIP_NO_CACHE_DIR, pip.conf) starts without cached wheels or
    downloads -- the bare machine's case. pip itself answers where its cache is."""
    proc = subprocess.run([str(python), "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    if proc.returncode != 0:
        return "disabled" in proc.stdout + proc.stderr  # PIP_NO_CACHE_DIR / no-cache-dir: nothing cached
    cache = Path(proc.stdout.strip())
    return not cache.is_dir() or not any(p.is_file() for p in cache.rglob("*"))


def built_record(env: Path) -> dict:
    """What the environment's .complete marker says about its build ({} for a marker from an older setup)."""
    try:
        record = json.loads((env / ".complete").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def build(env: Path, wanted: str) -> None:
    log = env.parent / f"{env.name}.log"
    log.write_text(f"pocketvlm setup of {env}\nextras: {wanted}\npython: {sys.executable} "
                   f"{platform.python_version()}\n")
    notes = check_toolchain(wanted)
    shutil.rmtree(env, ignore_errors=True)
    say(f"building the environment in {env} (first run only; pip's log: {log})")
    say("it installs torch (CPU), transformers, mlx, onnxruntime, coremltools and the rest (~3 GB), and "
        f"{COMPILE_NOTE}" if "gguf" in wanted or "all" in wanted else "it installs torch (CPU), transformers "
        "and the extras asked for")
    for note in notes:
        say(f"note: {note}")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "venv", str(env)], capture_output=True, text=True)
        with open(log, "a") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SetupError(f"setup failed while creating the virtual environment ({sys.executable} -m venv): "
                             f"see {log}")
        from_nothing = pip_cache_is_empty(env_python(env))  # asked before this build fills it
        pip = Pip(env_python(env), log)
        pip.run(["install", "-c", str(CONSTRAINTS), pinned("pip")], "upgrading pip")
        # torch first and pinned, so no later requirement can pull a multi-GB CUDA build
        pip.run(["install", "-c", str(CONSTRAINTS), pinned("torch"), pinned("setuptools")],
                "installing torch (CPU build)")
        pip.run(install_args(wanted), "installing pocketvlm and its extras", verbose=True)
        check = subprocess.run([str(env_python(env)), "-m", "pocketvlm", "--version"], capture_output=True,
                               text=True)
        if check.returncode != 0:
            with open(log, "a") as f:
                f.write(check.stdout + check.stderr)
            raise SetupError(f"setup failed while checking the installed command (pocketvlm --version): see {log}")
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)  # never leave a half-built environment to be mistaken for one
        raise
    # what this build proves: with from_nothing (no pip cache to lean on) it is the newcomer's path itself
    (env / ".complete").write_text(json.dumps({"key": env_key(), "built_s": round(time.monotonic() - start),
                                               "from_nothing": from_nothing}) + "\n")
    say(f"environment ready in {(time.monotonic() - start) / 60:.1f} min")


def points_here(env: Path) -> bool:
    """Whether the environment's pocketvlm (and its subpackages, which an editable install maps one by one) is this
    checkout's. Asked in isolated mode from a neutral folder: run from the checkout itself, `import pocketvlm` would
    find ./pocketvlm through the working directory and hide an install pointing at another (deleted) clone."""
    code = ("import pathlib, pocketvlm, pocketvlm.runtime; "
            "print(pathlib.Path(pocketvlm.__file__).resolve().parent.parent); "
            "print(pathlib.Path(pocketvlm.runtime.__file__).resolve().parent.parent)")
    proc = subprocess.run([str(env_python(env)), "-I", "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    return proc.returncode == 0 and {Path(line) for line in proc.stdout.splitlines()} == {ROOT}


def ensure() -> Path:
    check_python()
    wanted = extras()
    env = env_path()
    with _lock(env):
        if not (env / ".complete").is_file():
            build(env, wanted)
            prune_others(env)
            return env
        os.utime(env / ".complete")  # last used now: prune_others keeps the environments in use
        if not points_here(env):
            # the cached environment was built for another checkout: point its editable install here (no
            # downloads; pip's isolated build of the project needs setuptools from its cache or the index)
            log = env.parent / f"{env.name}.log"
            Pip(env_python(env), log).run(["install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                                          "pointing the environment at this checkout")
    return env


def dry_run() -> None:
    """The install resolved from nothing, with no cache: every wheel's metadata and every sdist's build
    requirements and metadata (built in isolation, as a bare machine would), nothing compiled or installed."""
    check_python()
    wanted = extras()
    with tempfile.TemporaryDirectory(prefix="pocketvlm-dry-run-") as tmp:
        venv_dir = Path(tmp) / "venv"
        log = Path(tmp) / "pip.log"
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, capture_output=True)
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
        env.pop("PIP_FIND_LINKS", None)
        pip = Pip(env_python(venv_dir), log, env=env)
        try:
            pip.run(["install", "-c", str(CONSTRAINTS), pinned("pip")], "upgrading pip")
            # the setup's own command (exact versions), then what `pip install "pocketvlm[all]"` resolves to
            pip.run([*install_args(wanted), "--dry-run"], "resolving the setup's install")
            pip.run(["install", "--dry-run", f"{ROOT}[all]"],
                    "resolving pip install pocketvlm[all]")
        except SetupError:
            sys.stderr.write(log.read_text()[-6000:])
            raise
        print(log.read_text())


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    try:
        if command == "path":
            print(env_path())
        elif command == "ensure":
            print(ensure())
        elif command == "dry-run":
            dry_run()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except SetupError as e:
        message = str(e)
        say(message if message.startswith("setup failed") else f"setup failed: {message}")
        return 1
    except KeyboardInterrupt:
        say("setup interrupted; nothing half-built is kept (run it again to build from the start)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
