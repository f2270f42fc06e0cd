"""Hostile or careless command lines: what --force may replace, where --out may point, and arguments no one should
send. Every refusal is one line, exit 2, with nothing touched and no scratch folder left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import assert_user_error, run_cli

QUESTION = "What color is the circle?"


def tree(root):
    """Every file under root with its bytes: what must survive a refusal untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_scratch(root) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in root.rglob("*"))


@pytest.fixture
def sandbox(tiny_model, tmp_path):
    """The issue's repro: sb/p/tiny (a source model) beside sb/p/precious.txt."""
    parent = tmp_path / "sb" / "p"
    shutil.copytree(tiny_model, parent / "tiny")
    (parent / "precious.txt").write_text("x\n")
    return parent


@pytest.mark.parametrize("fmt", ["onnx", "mlx", "gguf", "coreml"])
def test_force_never_replaces_a_folder_holding_the_source(sandbox, fmt):
    before = tree(sandbox.parent)
    line = assert_user_error(run_cli("export", sandbox / "tiny", "--to", fmt, "--out", sandbox, "--force"),
                             "is the source")
    assert "holds it" in line
    assert tree(sandbox.parent) == before and no_scratch(sandbox.parent)


def test_force_never_replaces_the_source_itself_or_writes_inside_it(sandbox):
    before = tree(sandbox.parent)
    assert_user_error(run_cli("export", sandbox / "tiny", "--to", "mlx", "--out", sandbox / "tiny", "--force"),
                      "is the source")
    assert_user_error(run_cli("export", sandbox / "tiny", "--to", "mlx", "--out", sandbox / "tiny" / "mlx"),
                      "inside the source")
    assert tree(sandbox.parent) == before and no_scratch(sandbox.parent)


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_force_never_replaces_the_working_directory_or_an_ancestor(sandbox, out):
    work = sandbox.parent / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    before = tree(sandbox.parent)
    proc = subprocess.run([sys.executable, "-m", "pocketvlm", "export", str(sandbox / "tiny"), "--to", "mlx", "--out",
                           out, "--force"], capture_output=True, text=True, cwd=work, env=os.environ)
    assert_user_error(proc, "working directory")
    assert tree(sandbox.parent) == before and no_scratch(sandbox.parent)


def test_force_never_replaces_home_or_the_filesystem_root(tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    assert_user_error(run_cli("export", tiny_model, "--to", "mlx", "--out", home, "--force", env={"HOME": str(home)}),
                      "your home folder")
    assert_user_error(run_cli("make-model", "/", "--force"), "the filesystem root")
    assert (home / ".bashrc").read_text() == "keep"


def test_force_only_replaces_an_earlier_pocketvlm_output_or_an_empty_folder(tiny_model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert_user_error(run_cli("make-model", mine, "--force"), "not a pocketvlm output", "--force only replaces")
    assert tree(mine) == {"thesis.tex": b"years of work"} and no_scratch(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("make-model", empty, "--force", "--quiet").returncode == 0
    earlier = tmp_path / "earlier"
    assert run_cli("make-model", earlier, "--quiet").returncode == 0
    proc = run_cli("make-model", earlier, "--seed", "3", "--force", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert '"seed": 3' in (earlier / "pocketvlm.json").read_text() and no_scratch(tmp_path)


def test_quantize_never_replaces_the_artifact_it_reads(tiny_model, tmp_path):
    art = tmp_path / "onnx"
    assert run_cli("export", tiny_model, "--to", "onnx", "--out", art, "--quiet").returncode == 0
    before = tree(art)
    assert_user_error(run_cli("quantize", art, "--quant", "int8", "--out", art, "--force"), "is the source")
    assert tree(art) == before and no_scratch(tmp_path)


def test_out_under_a_file_or_with_a_name_too_long_is_one_line(tiny_model, tmp_path):
    (tmp_path / "file").write_text("a file")
    assert_user_error(run_cli("make-model", tmp_path / "file" / "model"), "is a file, not a folder")
    assert_user_error(run_cli("make-model", tmp_path / ("m" * 245)), "name is too long")
    assert_user_error(run_cli("export", tiny_model, "--to", "mlx", "--out", tmp_path / ("m" * 245)),
                      "name is too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_that_is_a_symlink_is_refused(tiny_model, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    assert_user_error(run_cli("make-model", tmp_path / "link", "--force"), "symbolic link")
    assert (target / "keep.txt").read_text() == "keep"


def test_a_question_that_is_not_utf8_is_one_line(tiny_model, image_file):
    proc = subprocess.run([sys.executable, "-m", "pocketvlm", "ask", str(tiny_model), b"x\xff", "--image",
                           str(image_file)], capture_output=True, text=True, env=os.environ)
    assert_user_error(proc, "not valid UTF-8")


@pytest.mark.parametrize("args, fragment", [
    (["ask", "{model}", QUESTION, "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["ask", "{model}", QUESTION, "--max-tokens", "many"], "--max-tokens"),
    (["ask", "{model}", ""], "the question is empty"),
    (["ask", "{model}", "   \n\t "], "the question is empty"),
    (["ask", "{model}", QUESTION, "--image", "/dev/null"], "empty file"),
    (["ask", "{model}", QUESTION, "--image", "/"], "is a folder"),
    (["ask", "{model}", QUESTION, "--video", "/dev/null"], "empty file"),
    (["check", "{model}", "--max-tokens", "-3"], "--max-tokens must be at least 1"),
    (["bench", "{model}", "--max-tokens", "1"], "--max-tokens >= 2"),
    (["export", "{model}", "--to", "mlx", "--quant", "1bit", "--out", "x"], "unknown --quant '1bit' for mlx"),
    (["export", "{model}", "--to", "onnx", "--group-size", "64", "--out", "x"], "does not apply to onnx"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_are_one_line(tiny_model, tmp_path, args, fragment):
    args = [str(tiny_model) if a == "{model}" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "pocketvlm", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=os.environ, timeout=300)
    assert_user_error(proc, fragment)
    assert not any(tmp_path.iterdir())
