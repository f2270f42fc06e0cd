"""The mobile web demo (issue 8): `pocketvlm serve-web` serves samples/web/ and an ONNX export; headless Chromium, as a
phone with touch, loads the page, taps a sample picture, types a held-out question, taps Ask, and must get the right
answer, token for token what the Python onnxruntime backend answers. Plus the server's files, MIME types and errors.

The browser test needs Node.js, Debian's `chromium` and the page's npm packages (transformers.js, playwright-core);
.ci/run installs them. It skips, saying why, only when one of them is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES, assert_user_error, load_json, run_cli

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'pocketvlm[onnx]')")

from pocketvlm.media import open_image  # noqa: E402
from pocketvlm.prompt import Request  # noqa: E402
from pocketvlm.runtime import open_backend  # noqa: E402
from pocketvlm.runtime import web  # noqa: E402

WEB = SAMPLES / "web"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("POCKETVLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
NPM_CI = "npm ci --prefix samples/web --ignore-scripts"
MAX_NEW_TOKENS = 64  # the page's MAX_NEW_TOKENS (samples/web/app.js)
HELDOUT = SAMPLES / "heldout"


@pytest.fixture(scope="module")
def micro_onnx(tmp_path_factory) -> Path:
    """The embedded micro model exported to ONNX fp32 (the quant whose answers equal the reference's)."""
    out = tmp_path_factory.mktemp("web") / "micro-onnx"
    proc = run_cli("export", SAMPLES / "micro", "--to", "onnx", "--quant", "fp32", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _as_from_a_terminal():
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # under `.ci/run &` the server would never see the Ctrl-C this test sends. A terminal user's server has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """`pocketvlm serve-web` in a subprocess, as a user starts it; stopped with Ctrl-C (SIGINT)."""

    def __init__(self, artifact: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve-web", str(artifact), "--port", "0",
                                      *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_as_from_a_terminal)
        first = self.proc.stderr.readline()
        assert " at http://" in first, first + self.proc.stderr.read()
        self.banner = [first]
        self.url = first.split(" at ", 1)[1].split()[0]

    def get(self, path: str):
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=30) as response:
            return response.status, response.headers, response.read()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # read through the same text stream as the banner (communicate() would skip what readline() buffered)
        return self.proc.returncode, "".join(self.banner) + self.proc.stderr.read()


@pytest.fixture(scope="module")
def server(micro_onnx):
    if not (WEB / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file():
        pytest.skip(f"the web demo's npm packages are not installed (run: {NPM_CI})")
    srv = Server(micro_onnx)
    yield srv
    code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err  # Ctrl-C exits cleanly


def python_answers(artifact: Path, limit: int) -> list[dict]:
    """The held-out samples the page offers, each with the Python onnxruntime backend's answer and tokens."""
    backend = open_backend(artifact)
    rows = []
    for entry in load_json(HELDOUT / "questions.json")[:limit]:
        request = Request(entry["question"], images=[open_image(HELDOUT / entry["image"])])
        result = backend.run(request, MAX_NEW_TOKENS)
        pixels = backend.processor.encode(request).pixel_values
        rows.append({**entry, "page_image": f"/samples/{Path(entry['image']).name}", "python": result.answer,
                     "token_ids": result.token_ids, "prompt_ids": backend.prompt_token_ids(request),
                     "pixels_sha256": hashlib.sha256(pixels.astype("<f4").tobytes()).hexdigest()})
    return rows


def screenshot_dir(tmp_path: Path) -> Path:
    chosen = os.environ.get("POCKETVLM_ARTIFACTS")
    folder = Path(chosen) / "web" if chosen else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -------------------------------------------------------------------------------------------------- browser

@pytest.mark.browser
@pytest.mark.skipif(NODE is None, reason="node is not installed: the browser test needs Node.js 20+")
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium, as root; "
                                             ".ci/run installs it when it can)")
def test_phone_browser_answers_held_out_questions_like_the_python_backend(server, micro_onnx, tmp_path, capsys):
    """Two held-out questions of different tasks that the Python backend answers right (chosen at run time, so a
    retrained micro model needs no edit here), asked through the page in headless Chromium — one picture tapped among
    the samples, one handed to the photo picker: each answer must be the expected one and the Python backend's, with
    the same prompt tokens, the same pixels and the same answer tokens."""
    rows = python_answers(micro_onnx, web.SAMPLES_SHOWN)
    asks, tasks = [], set()
    for row in rows:
        if row["python"] == row["answer"] and row["task"] not in tasks:
            asks.append(row)
            tasks.add(row["task"])
        if len(asks) == 2:
            break
    assert asks, f"the Python backend answers none of the page's {len(rows)} samples right: {rows}"
    ask_in_browser(server, asks, tmp_path, capsys)


@pytest.mark.browser
@pytest.mark.skipif(NODE is None, reason="node is not installed: the browser test needs Node.js 20+")
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium, as root; "
                                             ".ci/run installs it when it can)")
def test_q4_export_runs_on_webassembly_like_the_python_backend(micro_onnx, tmp_path, capsys):
    """The smallest export is the one a phone wants: q4 must load on onnxruntime-web's WebAssembly backend (no WebGPU
    in headless Chromium here) and give the Python backend's tokens for the same picture and question."""
    if not (WEB / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file():
        pytest.skip(f"the web demo's npm packages are not installed (run: {NPM_CI})")
    q4 = tmp_path / "micro-q4"
    proc = run_cli("quantize", micro_onnx, "--quant", "q4", "--out", q4, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = python_answers(q4, 2)
    srv = Server(q4)
    try:
        results = ask_in_browser(srv, rows, tmp_path, capsys, right_answers=False)
    finally:
        code, err = srv.stop()
    assert code == 0 and "note:" not in err, err
    assert all(page["device"] == "wasm" for page in results)


def ask_in_browser(server, asks: list[dict], tmp_path, capsys, right_answers: bool = True) -> list[dict]:
    """Ask ASKS (rows of python_answers) through the page in headless Chromium; every answer must be the Python
    backend's (and the expected one, with right_answers), token for token. Returns the page's results."""
    # the first by tapping its sample picture, the second through the photo picker, as a phone's camera hands it over
    steps = [{"image": r["page_image"], "question": r["question"]} for r in asks]
    if len(steps) > 1:
        steps[1] = {"file": str(HELDOUT / asks[1]["image"]), "question": asks[1]["question"]}
    shots = screenshot_dir(tmp_path)
    start = time.perf_counter()
    proc = subprocess.run(
        [NODE, "--import", str(REPO / "tests" / "js" / "netguard.mjs"), str(WEB / "test" / "browser.mjs"), CHROMIUM,
         server.url, str(shots), json.dumps(steps)],
        capture_output=True, text=True, timeout=600, cwd=WEB)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\nweb demo: {len(asks)} questions in headless Chromium in {seconds:.1f}s "
              f"(page load {report.get('load_ms')} ms); screenshots: {', '.join(report['screenshots'])}")
    assert not report["blocked"], f"the page tried to leave loopback: {report['blocked']}"
    assert not report["errors"], "\n".join(report["errors"] + report["console"])
    assert not report["failed"], report["failed"]
    assert len(report["results"]) == len(asks) and len(report["screenshots"]) == len(asks)
    for row, page in zip(asks, report["results"]):
        what = f"{row['image']}: {row['question']}"
        assert page["question"] == row["question"], what
        assert page["answer"] == page["shown"] == row["python"], (what, page, row["python"])
        if right_answers:
            assert page["answer"] == row["answer"], (what, page)
        assert page["prompt_ids"] == row["prompt_ids"], what
        assert page["pixel_values_shape"] == [1, 1, 3, 128, 128], what
        assert page["pixel_values_sha256"] == row["pixels_sha256"], f"{what}: the page's pixels differ from ours"
        assert page["generated_ids"] == row["token_ids"], what
        assert page["device"] in ("wasm", "webgpu") and page["device"] in page["stats"]
        assert page["tokens"] == len(row["token_ids"]) and page["ttft_ms"] > 0
        assert "tokens/s" in page["stats"] or page["tokens"] == 1
    for shot in report["screenshots"]:
        assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report["results"]


# --------------------------------------------------------------------------------------------------- server

def test_server_hands_out_the_page_vendor_files_model_and_samples_only(server, micro_onnx):
    status, headers, body = server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'capture="environment"' in body
    assert b'name="viewport"' in body
    demo = json.loads(server.get("/demo.json")[2])
    assert demo["quant"] == "fp32" and demo["format"] == "onnx" and len(demo["samples"]) == web.SAMPLES_SHOWN
    assert all("answer" not in s for s in demo["samples"])  # the page finds the answers out
    types = {
        "/app.js": "application/javascript",
        "/style.css": "text/css",
        "/vendor/transformers.min.js": "application/javascript",
        "/vendor/ort/ort-wasm-simd-threaded.asyncify.mjs": "application/javascript",
        "/vendor/ort/ort-wasm-simd-threaded.asyncify.wasm": "application/wasm",
        f"/models/{demo['model']}/config.json": "application/json",
        f"/models/{demo['model']}/onnx/decoder_model_merged.onnx": "application/octet-stream",
        f"/models/{demo['model']}/onnx/decoder_model_merged.onnx_data": "application/octet-stream",
        demo["samples"][0]["image"]: "image/png",
    }
    for path, mime in types.items():
        status, headers, body = server.get(path)
        assert status == 200 and headers["Content-Type"].startswith(mime), (path, headers["Content-Type"])
        assert int(headers["Content-Length"]) == len(body) > 0
    config = server.get(f"/models/{demo['model']}/config.json")[2]
    assert config == (micro_onnx / "config.json").read_bytes()
    for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/vendor/../package.json", "/package.json",
                 "/node_modules/playwright-core/package.json", f"/models/{demo['model']}/../pocketvlm.json",
                 f"/models/{demo['model']}/pocketvlm.json", "/models/other/config.json", "/samples/199-number.png",
                 "/test/browser.mjs"):
        with pytest.raises(urllib.error.HTTPError) as error:
            server.get(path)
        assert error.value.code == 404, path


def test_lan_mode_prints_the_address_a_phone_opens(micro_onnx):
    if not (WEB / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file():
        pytest.skip(f"the web demo's npm packages are not installed (run: {NPM_CI})")
    srv = Server(micro_onnx, "--host", "0.0.0.0")
    try:
        assert srv.url.startswith("http://127.0.0.1:")
        assert srv.get("/")[0] == 200
    finally:
        code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err
    port = srv.url.rstrip("/").rsplit(":", 1)[1]
    for address in web.lan_addresses():
        assert f"on a phone on the same network, open http://{address}:{port}/" in err, err


# --------------------------------------------------------------------------------------------------- errors

def test_help_explains_serve_web():
    proc = run_cli("serve-web", "--help")
    assert proc.returncode == 0
    for word in ("ARTIFACT", "ONNX export", "--host", "0.0.0.0", "--port", "npm ci", "CDN"):
        assert word in proc.stdout, word


def test_bad_artifacts_are_refused_in_one_line(micro_onnx, tmp_path):
    assert_user_error(run_cli("serve-web", tmp_path / "nope"), "no such folder", "--to onnx")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("serve-web", tmp_path / "empty"), "not a pocketvlm artifact")
    assert_user_error(run_cli("serve-web", SAMPLES / "micro"), "'hf' artifact", "runs ONNX exports")
    damaged = tmp_path / "damaged"
    shutil.copytree(micro_onnx, damaged)
    (damaged / "onnx" / "embed_tokens.onnx_data").write_bytes(b"0")
    assert_user_error(run_cli("serve-web", damaged), "onnx/embed_tokens.onnx_data")


def test_port_in_use_is_one_line(micro_onnx):
    if not (WEB / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file():
        pytest.skip(f"the web demo's npm packages are not installed (run: {NPM_CI})")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_user_error(run_cli("serve-web", micro_onnx, "--port", port), f"port {port}", "in use", "--port")


def test_missing_npm_packages_name_the_command(micro_onnx, tmp_path, monkeypatch, capsys):
    from pocketvlm.cli import main

    bare = tmp_path / "web"
    bare.mkdir()
    for name in web.PAGE_FILES:
        shutil.copy(WEB / name, bare / name)
    monkeypatch.setattr(web, "web_dir", lambda: bare)
    assert main(["serve-web", str(micro_onnx)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pocketvlm: error: ")
    assert f"npm ci --prefix {bare}" in err
    (bare / "app.js").unlink()
    assert main(["serve-web", str(micro_onnx)]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_only_old_q4_exports_come_with_a_webgpu_note():
    """q4 exports keep their embedding table 8-bit so onnxruntime-web's WebAssembly runs them; an export from before
    (4-bit table, GatherBlockQuantized, a WebGPU-only kernel there) gets a note up front, and the page names the
    cause if it fails to load."""
    old = {"quant": "q4", "onnx": {"quantization": {"op": "MatMulNBits / GatherBlockQuantized"}}}
    assert web.notes(old) and "WebGPU" in web.notes(old)[0]
    current = {"quant": "q4", "onnx": {"quantization": {"op": "MatMulNBits"}}}
    assert all(web.notes({**current, "quant": q}) == [] for q in ("fp32", "fp16", "int8", "q4"))
    assert "GatherBlockQuantized" in (WEB / "app.js").read_text()
