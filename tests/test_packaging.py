"""`pip install .` and `pip install -e .` in fresh venvs map the top-level folders into the pocketvlm package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE_PARTS = ["pyproject.toml", "README.md", "pocketvlm", "export", "quantize", "runtime", "bench_device", "samples"]
CHECK = """
import pathlib, pocketvlm, pocketvlm.cli, pocketvlm.export, pocketvlm.quantize, pocketvlm.bench_device
import pocketvlm.runtime, pocketvlm.runtime.reference
from pocketvlm.presets import preset
assert preset("500m")["text"]["hidden_size"] == 960  # package data travelled
from importlib import resources
assert (resources.files("pocketvlm.samples") / "heldout" / "questions.json").is_file()
print(pathlib.Path(pocketvlm.runtime.__file__).resolve())
"""


def fresh_venv(tmp: Path) -> Path:
    """A new venv that sees this environment's packages only as a fallback (a .pth line), never its pocketvlm.

    Nothing is downloaded: dependencies are already here, and pip builds without isolation.
    """
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "zz_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def copy_source(tmp: Path) -> Path:
    src = tmp / "src"
    for part in PACKAGE_PARTS:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / part, src / part)
    return src


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_maps_the_stage_folders_into_pocketvlm(tmp_path, editable):
    venv, src = fresh_venv(tmp_path), copy_source(tmp_path)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
               *(["-e"] if editable else []), str(src)]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr

    proc = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runtime_init = Path(proc.stdout.strip())
    if editable:
        assert runtime_init == (src / "runtime" / "__init__.py").resolve()
    else:
        assert runtime_init.is_relative_to(venv.resolve()) and runtime_init.parts[-3:] == (
            "pocketvlm", "runtime", "__init__.py")

    proc = subprocess.run([str(venv / "bin" / "pocketvlm"), "make-model", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "--preset" in proc.stdout, proc.stderr
