"""`pocketvlm serve-web` against a hostile artifact and a hostile client (issue 16): it must only ever hand out files
inside the artifact (a manifest that lists '..', an absolute path or a symlink out is refused at start; a file
swapped for a symlink later is not followed), never tell the network where the model lives on disk, and treat
malformed, slow, pipelined or endless requests like `serve` does: an error with the right status, a connection that
stays usable or is closed cleanly, a bounded pool of workers.

The artifacts here are small fakes with a real manifest (the server never loads a model), so nothing is exported.
The running-server tests need the page's npm packages, as tests/test_web.py does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import SAMPLES, assert_user_error, run_cli
from rawhttp import Raw, request

from pocketvlm.errors import ArtifactError
from pocketvlm.manifest import FILENAME, write_manifest
from pocketvlm.runtime import web

NPM_CI = "npm ci --prefix samples/web --ignore-scripts"
needs_page = pytest.mark.skipif(not (SAMPLES / "web" / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file(),
                                reason=f"the web demo's npm packages are not installed (run: {NPM_CI})")
SECRET = b"root:x:0:0:the secret outside the artifact\n"


def fake_onnx(root: Path, *, source: dict | None = None, big: int = 0) -> Path:
    """An 'ONNX export' of a few bytes with a genuine manifest: all serve-web checks and serves."""
    (root / "onnx").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "smolvlm"}')
    (root / "onnx" / "decoder_model_merged.onnx").write_bytes(b"onnx graph")
    if big:
        (root / "onnx" / "decoder_model_merged.onnx_data").write_bytes(os.urandom(big))
    write_manifest(root, format="onnx", quant="fp32", tools={},
                   source=source or {"id": "preset:micro", "revision": None})
    return root


def list_extra(artifact: Path, path: str, content_of: Path | None = None) -> None:
    """Add an entry to the manifest by hand, with the right size and hash: what a crafted artifact would do."""
    manifest = json.loads((artifact / FILENAME).read_text())
    target = content_of or (artifact / path)
    data = target.read_bytes()
    manifest["files"].append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (artifact / FILENAME).write_text(json.dumps(manifest))


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


# ---------------------------------------------------------------------------------------- artifact integrity

def _crafted(tmp_path, secret, how):
    art = fake_onnx(tmp_path / "art")
    if how == "dot-dot":
        list_extra(art, "../outside/passwd", secret)
    elif how == "absolute":
        list_extra(art, str(secret), secret)
    elif how == "etc-passwd" and Path("/etc/passwd").is_file():
        list_extra(art, "/etc/passwd", Path("/etc/passwd"))
    elif how == "etc-passwd":
        pytest.skip("no /etc/passwd here")
    elif how == "inner dot-dot":
        list_extra(art, "onnx/../../outside/passwd", secret)
    elif how == "dot segment":
        list_extra(art, "./config.json", art / "config.json")
    elif how == "empty segment":
        list_extra(art, "onnx//decoder_model_merged.onnx", art / "onnx" / "decoder_model_merged.onnx")
    elif how == "backslashes":
        list_extra(art, "onnx\\..\\..\\outside\\passwd", secret)
    elif how == "symlinked file":
        (art / "onnx" / "vision_encoder.onnx").symlink_to(secret)
        list_extra(art, "onnx/vision_encoder.onnx")
    elif how == "symlinked folder":
        (art / "linked").symlink_to(secret.parent, target_is_directory=True)
        list_extra(art, "linked/passwd")
    elif how == "not a string":
        manifest = json.loads((art / FILENAME).read_text())
        manifest["files"].append({"path": 5, "bytes": 1, "sha256": "0"})
        (art / FILENAME).write_text(json.dumps(manifest))
    return art


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "etc-passwd", "inner dot-dot", "dot segment",
                                 "empty segment", "backslashes", "symlinked file", "symlinked folder",
                                 "not a string"])
def test_manifest_paths_outside_the_artifact_are_refused_at_start(tmp_path, secret, how):
    art = _crafted(tmp_path, secret, how)
    # refused by the manifest reader itself (a path that is not plain and relative, or no path) or, for a symlink
    # out, by serve-web's own check or the verifier: every command refuses such an artifact, not only serve-web
    refusal = "refusing to serve it|not a plain relative path inside the folder|has no path|link out of the artifact"
    with pytest.raises(ArtifactError, match=refusal):
        web.check_artifact(art)
    if how in ("dot-dot", "symlinked file", "etc-passwd"):  # and as a user sees it: one line, exit 2
        proc = run_cli("serve-web", art)
        line = assert_user_error(proc)
        assert re.search(refusal, line), line
        assert SECRET.decode().strip() not in line


def test_symlinks_that_stay_inside_the_artifact_are_fine(tmp_path):
    art = fake_onnx(tmp_path / "art")
    (art / "onnx" / "alias.onnx").symlink_to("decoder_model_merged.onnx")
    list_extra(art, "onnx/alias.onnx")
    assert web.check_artifact(art)["format"] == "onnx"


@pytest.mark.parametrize("source, shown", [
    ({"id": "/home/someone/secret-project/models/my-vlm", "revision": None,
      "path": "/home/someone/secret-project/models/my-vlm"}, "my-vlm"),
    ({"id": "models/my-vlm", "revision": None, "path": "/home/someone/models/my-vlm"}, "my-vlm"),
    ({"path": "/home/someone/models/only-a-path/"}, "only-a-path"),
    ({"id": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "revision": "abc123",
      "path": "/home/someone/.cache/huggingface/hub/x"}, "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    ({"id": "preset:micro", "revision": None, "seed": 0}, "preset:micro"),
    ({}, None),
])
def test_demo_json_names_the_source_without_its_absolute_path(source, shown):
    assert web.public_source(source) == shown


@needs_page
def test_demo_json_served_has_no_absolute_path(tmp_path):
    where = "/home/someone/secret-project/models/my-vlm"
    demo = web.WebDemo(fake_onnx(tmp_path / "art", source={"id": where, "revision": None, "path": where}))
    text = demo.demo_json().decode()
    assert json.loads(text)["source"] == "my-vlm" and "/home/" not in text and str(tmp_path) not in text


# ------------------------------------------------------------------------------------------ a running server

class ServedWeb:
    def __init__(self, artifact: Path, **kw):
        self.demo = web.WebDemo(artifact)
        self.server = web.make_server(self.demo, "127.0.0.1", 0, **kw)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def raw(self, **kw) -> Raw:
        return Raw(self.port, **kw)

    def get(self, raw: Raw, path: str):
        raw.send(request("GET", path))
        return raw.response()

    def usable(self, raw: Raw) -> bool:
        r = self.get(raw, "/demo.json")
        return r is not None and r.status == 200 and json.loads(r.body)["model"] == self.demo.model_id

    def healthy(self) -> bool:
        with self.raw() as raw:
            return self.usable(raw)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    if not (SAMPLES / "web" / "node_modules" / web.TRANSFORMERS_BUNDLE).is_file():
        pytest.skip(f"the web demo's npm packages are not installed (run: {NPM_CI})")
    s = ServedWeb(fake_onnx(tmp_path / "art", big=8 << 20), timeout=2.0, workers=3)
    yield s
    s.stop()


def test_a_listed_file_swapped_for_a_symlink_after_start_is_not_followed(served, secret):
    model = f"/models/{served.demo.model_id}/onnx/decoder_model_merged.onnx"
    with served.raw() as raw:
        assert served.get(raw, model).body == b"onnx graph"
        target = served.demo.root / "onnx" / "decoder_model_merged.onnx"
        target.unlink()
        target.symlink_to(secret)
        response = served.get(raw, model)
        assert response.status == 404 and SECRET not in response.body


def test_traversal_and_odd_paths_are_404s(served):
    model = f"/models/{served.demo.model_id}"
    paths = [f"{model}/../{FILENAME}", f"{model}/{FILENAME}", f"{model}/%2e%2e/%2e%2e/outside/passwd",
             f"{model}/..%2f..%2foutside%2fpasswd", f"{model}/%00", "/%00", f"{model}/config.json%00.png",
             "/samples/../../pyproject.toml", "/vendor/../../package.json", "/vendor/%2e%2e/package.json",
             "/./index.html", "/index.html/..", "//etc/passwd", "/etc/passwd", "/%F0%9F%98%80", "/" + "a" * 10_000,
             "/node_modules/onnxruntime-web/package.json", f"{model}/onnx", f"{model}/", "/models/",
             "/../../../../etc/passwd"]
    with served.raw() as raw:
        for path in paths:
            response = served.get(raw, path)
            assert response.status == 404, (path, response.status)
            assert SECRET not in response.body and b"[tool.setuptools" not in response.body
        raw.send(("GET /models/é/😀 HTTP/1.1\r\nHost: x\r\n\r\n").encode("utf-8"))  # raw UTF-8 in the target
        assert raw.response().status == 404
        assert served.usable(raw)


def test_the_listed_files_are_still_served_whole(served):
    with served.raw() as raw:
        response = served.get(raw, f"/models/{served.demo.model_id}/onnx/decoder_model_merged.onnx_data")
        data = (served.demo.root / "onnx" / "decoder_model_merged.onnx_data").read_bytes()
        assert response.status == 200 and response.body == data
        assert response.headers["cross-origin-embedder-policy"] == "require-corp"
        raw.send(request("HEAD", "/"))
        head = raw.response(head=True)
        page_size = (SAMPLES / "web" / "index.html").stat().st_size
        assert head.status == 200 and int(head.headers["content-length"]) == page_size
        assert served.usable(raw)  # a HEAD sends no body: the connection is still in step


WEB_MALFORMED = [
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello on plain http
    ("HTTP/0.9", b"GET /\r\n", 400),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("bad Content-Length", request("GET", "/", headers={"Content-Length": "-1"}), 400),
    ("POST with a body", request("POST", "/", body=b"x" * 5000), 405),
    ("PUT", request("PUT", "/demo.json", body=b"{}"), 405),
    ("OPTIONS", request("OPTIONS", "*"), 405),
    ("unknown method", request("BREW", "/"), 501),
    ("chunked POST", request("POST", "/", headers={"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n0\r\n\r\n",
     405),
    ("request line of 70 KB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("150 headers", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
     431),
    ("GET with a body", request("GET", "/demo.json", body=b"ignored"), 200),
]


@pytest.mark.parametrize("name, data, status", WEB_MALFORMED, ids=[m[0] for m in WEB_MALFORMED])
def test_malformed_requests_get_an_error_and_a_sane_connection(served, name, data, status):
    with served.raw() as raw:
        raw.send(data)
        response = raw.response()
        assert response is not None and response.status == status, (response and response.status, name)
        if status >= 400:
            assert response.body.strip() and response.headers["x-content-type-options"] == "nosniff"
        if status == 405:
            assert response.headers["allow"] == "GET, HEAD"
        if response.closes:
            assert raw.at_eof()
        else:
            assert served.usable(raw)
    assert served.healthy()


def test_pipelined_gets_are_answered_in_order(served):
    with served.raw() as raw:
        raw.send(request("GET", "/demo.json") + request("GET", "/nope") + request("GET", "/style.css")
                 + request("GET", "/demo.json"))
        assert [raw.response().status for _ in range(4)] == [200, 404, 200, 200]


def test_http_1_0_gets_its_file_and_a_close(served):
    with served.raw() as raw:
        raw.send(request("GET", "/demo.json", version="HTTP/1.0", host=None))
        response = raw.response()
        assert response.status == 200 and json.loads(response.body)["format"] == "onnx"
        assert raw.at_eof()


def test_slow_and_idle_clients_hold_no_worker(served):
    assert served.healthy()  # the pool is up
    before = threading.active_count()
    slow = [served.raw() for _ in range(served.server.workers + 3)]
    idle = [served.raw() for _ in range(30)]
    try:
        for raw in slow:
            raw.send(b"GET /demo.js")  # and never the rest
        assert served.healthy()
        assert threading.active_count() == before
        for raw in slow:
            response = raw.response()
            assert response.status == 408 and response.closes
        for raw in idle:
            assert raw.at_eof()
    finally:
        for raw in slow + idle:
            raw.close()


def test_a_phone_that_stops_reading_a_big_file_does_not_block_the_others(served):
    with served.raw() as stalled:
        stalled.send(request("GET", f"/models/{served.demo.model_id}/onnx/decoder_model_merged.onnx_data"))
        line = stalled.file.readline()
        assert b" 200 " in line  # the 8 MB transfer started; now it is never read
        for _ in range(served.server.workers * 2):
            assert served.healthy()


# ------------------------------------------------------------------------------------------------ the command

@pytest.mark.parametrize("args, fragment", [
    (["--port", "70000"], "--port must be a number from 0 to 65535"),
    (["--port", "-1"], "--port must be a number from 0 to 65535"),
    (["--host", "phone.local"], "--host takes an IP address"),
])
def test_bad_serve_web_options_are_one_line_errors(tmp_path, args, fragment):
    assert_user_error(run_cli("serve-web", fake_onnx(tmp_path / "art"), *args), fragment)


def _as_from_a_terminal():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_page
@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_serve_web_on_ipv6_loopback(tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured here")
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve-web", str(fake_onnx(tmp_path / "art")),
                             "--host", "::1", "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_from_a_terminal)
    try:
        first = proc.stderr.readline()
        match = re.search(r"at http://\[::1\]:(\d+)/", first)
        assert match, first
        with Raw(int(match.group(1)), host="::1") as raw:
            raw.send(request("GET", "/demo.json", host=f"[::1]:{match.group(1)}"))
            assert raw.response().status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
