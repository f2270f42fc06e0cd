"""`pocketvlm ask` and `make-model` as a user runs them: answers, JSON, and a one-line error for every bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from conftest import SAMPLES, assert_user_error, draw_image, run_cli
from PIL import Image

QUESTION = "What color is the circle?"


def png_header_only(path, width, height):
    """A PNG that claims width x height: enough for a decoder to size its buffers (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_ask_streams_the_same_answer_it_reports_in_json(tiny_model, image_file):
    plain = run_cli("ask", tiny_model, QUESTION, "--image", image_file, "--max-tokens", 16)
    assert plain.returncode == 0, plain.stderr
    as_json = run_cli("ask", tiny_model, QUESTION, "--image", image_file, "--max-tokens", 16, "--json")
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert plain.stdout.strip() == result["answer"]
    assert result["backend"] == "reference" and result["quant"] == "fp32"
    assert 1 <= len(result["token_ids"]) <= 16
    assert set(result["timings"]) >= {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert "ttft" in plain.stderr and "Traceback" not in plain.stderr


def test_ask_answers_about_a_video_and_a_sample_image(tiny_model, video_file):
    proc = run_cli("ask", tiny_model, "What happens?", "--video", video_file, "--max-tokens", 6, "--json",
                   "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 6
    sample = SAMPLES / "images" / "red_circle.png"
    proc = run_cli("ask", tiny_model, QUESTION, "--image", sample, "--max-tokens", 4)
    assert proc.returncode == 0, proc.stderr


def test_help_explains_each_command():
    for command, words in {"ask": ["--image", "--video", "--json", "Hub id"],
                           "make-model": ["--preset", "256m", "2.2b", "random weights"]}.items():
        proc = run_cli(command, "--help")
        assert proc.returncode == 0
        for word in words:
            assert word in proc.stdout, (command, word)


# -------------------------------------------------------------------------------------------- bad images

def _bad_images(tmp):
    cases = {}
    cases["missing"] = (tmp / "nope.png", "no such file")
    (tmp / "empty.png").write_bytes(b"")
    cases["zero bytes"] = (tmp / "empty.png", "empty file (0 bytes)")
    (tmp / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    cases["corrupt"] = (tmp / "garbage.png", "not an image")
    whole = tmp / "whole.png"
    draw_image(300, 200).save(whole)
    (tmp / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases["truncated"] = (tmp / "truncated.png", "corrupt or truncated")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(tmp / "cmyk.jpg")
    cases["CMYK"] = (tmp / "cmyk.jpg", "CMYK")
    Image.new("I;16", (64, 64), 1000).save(tmp / "deep.png")
    cases["16-bit"] = (tmp / "deep.png", "16-bit")
    draw_image(64, 64).convert("P").save(tmp / "palette.png")
    cases["palette"] = (tmp / "palette.png", "palette")
    frames = [draw_image(64, 64, seed=i) for i in range(3)]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases["animated"] = (tmp / "anim.gif", "animated image with 3 frames")
    cases["bomb"] = (png_header_only(tmp / "bomb.png", 9000, 9000), "81 MP), over the limit")
    cases["huge bomb"] = (png_header_only(tmp / "huge.png", 60000, 60000), "decompression-bomb")
    cases["absurd side"] = (png_header_only(tmp / "strip.png", 30000, 2), "over the limit")
    cases["folder"] = (tmp, "is a folder")
    return cases


def test_every_bad_image_is_one_line_exit_2(tiny_model, tmp_path):
    for name, (path, fragment) in _bad_images(tmp_path).items():
        proc = run_cli("ask", tiny_model, QUESTION, "--image", path)
        line = assert_user_error(proc, fragment)
        assert str(path) in line, name


def test_bad_videos_are_one_line_exit_2(tiny_model, tmp_path):
    (tmp_path / "fake.mp4").write_text("not a video")
    assert_user_error(run_cli("ask", tiny_model, "What?", "--video", tmp_path / "fake.mp4"), "not a video")
    assert_user_error(run_cli("ask", tiny_model, "What?", "--video", tmp_path / "none.mp4"), "no such file")
    draw_image().save(tmp_path / "still.png")
    assert_user_error(run_cli("ask", tiny_model, "What?", "--video", tmp_path / "still.png"),
                      "is a still image")


# ------------------------------------------------------------------------------------------- bad models

def test_bad_model_sources_are_one_line_exit_2(tmp_path, image_file, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("ask", empty, QUESTION, "--image", image_file), "no config.json",
                      "not a SmolVLM model folder")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_user_error(run_cli("ask", llama, QUESTION, "--image", image_file), "model_type is 'llama'")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_user_error(run_cli("ask", broken, QUESTION, "--image", image_file), "unreadable JSON")
    assert_user_error(run_cli("ask", tmp_path / "nowhere" / "x", QUESTION), "no such folder")
    assert_user_error(run_cli("ask", image_file, QUESTION), "is a file")


def test_hub_id_fails_fast_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("ask", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", QUESTION, env=env)
    assert_user_error(proc, "HuggingFaceTB/SmolVLM2-500M-Video-Instruct is not in the Hugging Face cache",
                      "HF_HUB_OFFLINE")


def test_hub_id_fails_cleanly_when_the_hub_is_unreachable(tmp_path):
    # A closed loopback port stands in for the unreachable Hub (the guard forbids anything else).
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("ask", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", QUESTION, env=env, timeout=120)
    assert_user_error(proc, "cannot fetch HuggingFaceTB/SmolVLM2-256M-Video-Instruct from the Hugging Face Hub")


def test_a_changed_artifact_file_is_refused(tiny_model, tmp_path, image_file):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    tokenizer = copy / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[100] ^= 1  # same size, different bytes
    tokenizer.write_bytes(bytes(data))
    assert_user_error(run_cli("ask", copy, QUESTION, "--image", image_file), "tokenizer.json does not match")
    (copy / "model.safetensors").unlink()
    assert_user_error(run_cli("ask", copy, QUESTION, "--image", image_file), "model.safetensors is missing")


# ----------------------------------------------------------------------------------------- bad arguments

def test_bad_arguments_are_one_line_exit_2(tiny_model, image_file, video_file):
    assert_user_error(run_cli("ask", tiny_model, QUESTION, "--max-tokens", 0), "--max-tokens")
    assert_user_error(run_cli("ask", tiny_model, QUESTION, "--image", image_file, "--video", video_file),
                      "not both")
    assert_user_error(run_cli("ask", tiny_model, "what is <image>?", "--image", image_file), "reserved token")
    assert_user_error(run_cli("ask", tiny_model, "why " * 3000, "--image", image_file),
                      "the model's context is 2048")


def test_argparse_errors_exit_2_without_traceback():
    proc = run_cli("make-model", "x", "--preset", "7b")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("force", [False, True])
def test_make_model_never_overwrites_without_force(tmp_path, force):
    """A folder holding someone's files is never replaced: without --force it is "not empty", with --force it is
    "not a pocketvlm output" (--force only replaces those, or empty folders); an earlier output is replaced."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("make-model", out, "--quiet", *(["--force"] if force else []))
    if force:
        assert_user_error(proc, "is not a pocketvlm output", "--force only replaces")
    else:
        assert_user_error(proc, "already exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no partial folder left behind
    earlier = tmp_path / "earlier"
    assert run_cli("make-model", earlier, "--quiet").returncode == 0
    proc = run_cli("make-model", earlier, "--quiet", "--seed", "1", *(["--force"] if force else []))
    if force:
        assert proc.returncode == 0, proc.stderr
        assert '"seed": 1' in (earlier / "pocketvlm.json").read_text()
    else:
        assert_user_error(proc, "already exists and is not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "model"]


def test_a_changed_byte_is_caught_on_every_open_even_with_the_same_size_and_mtime(tiny_model, tmp_path,
                                                                                    monkeypatch):
    """Every open hashes every byte (no size/mtime shortcut): a corruption that keeps size and mtime is refused
    after a first clean verification, as before it. POCKETVLM_VERIFY=sizes, the opt-in quick mode, is named for
    what it does not check."""
    import os
    import shutil

    import pocketvlm.manifest as manifest

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    listed = manifest.read_manifest(copy)
    manifest.verify(copy, listed)
    weights = copy / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_size == before.st_size
    with pytest.raises(manifest.ArtifactError, match="model.safetensors does not match"):
        manifest.verify(copy, listed)
    assert_user_error(run_cli("ask", copy, QUESTION), "model.safetensors does not match its sha256")
    monkeypatch.setenv("POCKETVLM_VERIFY", "sizes")
    manifest.verify(copy, listed)  # sizes only: does not see the change, as its name says


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_removes_the_half_built_folder(tmp_path, signame):
    """A killed (or hung-up) make-model leaves neither OUT nor its OUT.partial-* scratch folder."""
    import signal
    import subprocess
    import sys
    import time

    signum = getattr(signal, signame)
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "make-model", str(tmp_path / "m"), "--preset",
                             "256m", "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("m.partial-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(tmp_path.glob("m.partial-*")), "the scratch folder never appeared"
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_a_finaliser_swallows_is_raised_again_by_the_next_check(signame):
    """A signal whose exception is raised inside a __del__ (the garbage collector runs them at any point) is printed
    and dropped by Python; pocketvlm.interrupts keeps it, and check() -- once per training step -- raises it again.
    (A fine-tune trained on for minutes after Ctrl-C under the suite.)"""
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "from pocketvlm import interrupts\n"
            "interrupts.install()\n"
            "class Finaliser:\n"
            "    def __del__(self):\n"
            f"        os.kill(os.getpid(), signal.{signame})\n"
            "        sum(range(1000))  # the handler runs here, inside __del__\n"
            "Finaliser()\n"
            "print('went on', flush=True)\n"
            "try:\n"
            "    interrupts.check()\n"
            "except BaseException as e:\n"
            "    print('raised again:', type(e).__name__, getattr(e, 'code', ''), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" in proc.stderr  # Python dropped the first raise, as it does
    expected = "KeyboardInterrupt " if signame == "SIGINT" else "SystemExit 143"
    assert proc.stdout.splitlines() == ["went on", f"raised again: {expected}"], proc.stdout


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_a_finaliser_swallowed_keeps_the_output_from_being_committed(tmp_path, signame):
    """The signal arrives while the output is being built, its exception is raised inside a __del__ and dropped, the
    build finishes: atomic_output still does not rename the folder into place (the CI run where a SIGTERMed
    make-model exited 0 with its output written), and the CLI exits as stopped."""
    import subprocess
    import sys

    out = tmp_path / "m"
    code = ("import os, signal, sys\n"
            "from pocketvlm import interrupts\n"
            "from pocketvlm.manifest import atomic_output, write_manifest\n"
            "interrupts.install()\n"
            "class Finaliser:\n"
            "    def __del__(self):\n"
            f"        os.kill(os.getpid(), signal.{signame})\n"
            "        sum(range(1000))\n"
            "try:\n"
            "    with atomic_output(sys.argv[1]) as scratch:\n"
            "        Finaliser()\n"
            "        (scratch / 'weights.bin').write_bytes(b'x' * 1000)\n"
            "        write_manifest(scratch, format='hf', quant='fp32', source={'id': 'test'}, tools={})\n"
            "        print('built', flush=True)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n"
            "    sys.exit(130)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in proc.stderr, proc.stderr  # the first raise was dropped, the build went on
    expected = 130 if signame == "SIGINT" else 143
    assert (proc.returncode, proc.stdout.split()) == (expected, ["built"] + (["interrupted"] if expected == 130
                                                                             else [])), proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its scratch folder


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run_but_a_live_one_is_not(tmp_path):
    """kill -9 (or the out-of-memory killer) gives no chance to clean up: the OUT.partial-* folder stays. The next
    run writing OUT removes it; a scratch folder another process is still building is kept, and nothing else is
    touched: other names, another OUT's scratch, a file or a link named like a scratch folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "m"
    builder = ("import sys\nfrom pocketvlm.manifest import atomic_output\n"
               "with atomic_output(sys.argv[1]) as scratch:\n"
               "    (scratch / 'half.bin').write_bytes(b'x' * 1000)\n"
               "    print(scratch, flush=True)\n"
               "    sys.stdin.readline()\n"  # building until told to stop
               "    raise SystemExit(1)\n")

    def start_building():
        proc = subprocess.Popen([sys.executable, "-c", builder, str(out)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        scratch = Path(proc.stdout.readline().strip())
        assert scratch.parent == tmp_path and (scratch / "half.bin").is_file(), scratch
        return proc, scratch

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("mine")
    lookalikes = [tmp_path / "m.partial-notours", tmp_path / "other.partial-0123abcd", tmp_path / "m.partial-0123"]
    for folder in lookalikes:
        folder.mkdir()
        (folder / "data.txt").write_text("mine")
    (tmp_path / "m.partial-deadbeef").symlink_to(keep, target_is_directory=True)
    (tmp_path / "m.partial-feedf00d").write_text("a file, not a scratch folder")

    live, building = start_building()
    try:
        killed, dead = start_building()  # starting beside the live one leaves it alone
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert (dead / "half.bin").is_file(), "kill -9 cannot clean up: the scratch folder stays"
        assert (building / "half.bin").is_file()
        proc = run_cli("make-model", out, "--preset", "tiny", "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert "removed 1 scratch folder(s) of" in proc.stderr and "left by a killed run" in proc.stderr
        assert not dead.exists() and (out / "pocketvlm.json").is_file()
        assert (building / "half.bin").is_file() and live.poll() is None  # locked: kept
    finally:
        live.communicate("stop\n", timeout=60)
    assert not building.exists()  # its own failure cleaned it up
    assert all((folder / "data.txt").read_text() == "mine" for folder in (keep, *lookalikes))
    assert (tmp_path / "m.partial-deadbeef").is_symlink() and (tmp_path / "m.partial-feedf00d").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m", "keep", "m.partial-deadbeef", "m.partial-feedf00d", *(f.name for f in lookalikes)])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_whole_chain_before_the_one_line(tmp_path, how):
    """--debug / POCKETVLM_DEBUG=1: the cause a one-line error summarises is shown in full (here PIL's own
    exception under the MediaError), and the last line is still the one-line message."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    args = ("--debug", "ask", tmp_path, QUESTION, "--image", bad) if how == "flag" else \
        ("ask", tmp_path, QUESTION, "--image", bad)
    proc = run_cli(*args, env={"POCKETVLM_DEBUG": "1"} if how == "env" else None)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("pocketvlm: error: ") and "not an image" in lines[-1]
    assert "Traceback" in proc.stderr and "UnidentifiedImageError" in proc.stderr
    assert "The above exception was the direct cause" in proc.stderr
    quiet = run_cli("ask", tmp_path, QUESTION, "--image", bad, env={"POCKETVLM_DEBUG": "0"})
    assert_user_error(quiet, "not an image")


def test_bench_report_is_a_subcommand_with_its_own_help():
    proc = run_cli("bench", "report", "--help")
    assert proc.returncode == 0 and "RESULTS.json" in proc.stdout and "--out" in proc.stdout
    assert "--runs" not in proc.stdout  # the run options are not report's
    proc = run_cli("bench", "run", "--help")
    assert proc.returncode == 0 and "--runs" in proc.stdout


@pytest.mark.parametrize("threads", ["0", "-1", "100000", "two", "1.5"])
def test_thread_counts_are_bounded(tiny_model, image_file, threads):
    for command in (["ask", tiny_model, QUESTION, "--image", image_file], ["serve", tiny_model],
                    ["bench", tiny_model]):
        assert_user_error(run_cli(*command, "--threads", threads), "--threads")
