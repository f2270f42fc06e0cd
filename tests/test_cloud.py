"""The cloud client against real HTTP servers on loopback: pocketvlm's own OpenAI-compatible server over the tiny
model, and a small scripted server for the faults (429 storm, 500, stall, cut stream, 401)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import draw_image

from pocketvlm.bench_device.cloud import CloudError, ask, build_payload, get_provider
from pocketvlm.prompt import Request
from pocketvlm.runtime.server import make_server

KEY = "sk-test-0123456789abcdef"


def png(seed=0) -> bytes:
    buf = io.BytesIO()
    draw_image(seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(reference):
    server = make_server(reference, "127.0.0.1", 0, model_id="tiny", api_key=KEY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("dialect", ["openai", "mistral"])
def test_streamed_answer_usage_and_timings_from_a_real_server(served, reference, dialect):
    provider = get_provider("openai-compatible", base_url=served, model="tiny")
    if dialect == "mistral":
        provider = get_provider("mistral-medium-3", base_url=served, model="tiny")
    result = ask(provider, KEY, "What color is the circle?", [png()], 12)
    from pocketvlm.media import open_image_bytes

    expected = reference.run(Request("What color is the circle?", images=[open_image_bytes(png())]), 12)
    assert result.text == expected.answer
    assert result.completion_tokens == len(expected.token_ids)
    assert result.prompt_tokens == expected.prompt_tokens
    assert 0 < result.ttft_s <= result.total_s and result.attempts == 1


def test_payload_dialects():
    mistral = build_payload(get_provider("mistral-medium-3"), "q", [b"\x89PNG"], 5)
    openai = build_payload(get_provider("openai-compatible"), "q", [b"\x89PNG"], 5)
    assert isinstance(mistral["messages"][0]["content"][0]["image_url"], str)
    assert mistral["messages"][0]["content"][0]["image_url"].startswith("data:image/png;base64,")
    assert openai["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert mistral["model"] == "mistral-medium-2505" and mistral["stream"] is True
    assert "stream_options" in openai and "stream_options" not in mistral


def test_server_refuses_bad_requests(served):
    import urllib.error
    import urllib.request

    def post(body, key=KEY):
        req = urllib.request.Request(served + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "hi"}]}]})
    assert status == 400 and "only data: URLs" in body["error"]["message"]
    status, body = post({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, {"type": "text", "text": "hi"}]}]})
    assert status == 400 and "not an image" in body["error"]["message"]
    status, body = post({"messages": []})
    assert status == 400
    status, body = post({"messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert status == 401
    status, body = post({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


# ------------------------------------------------------------------------------------------------ faults

class Script:
    """What the fault server answers, request after request."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.seen = 0


def fault_handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            step = script.steps[min(script.seen, len(script.steps) - 1)]
            script.seen += 1
            kind = step[0]
            if kind == "status":
                _, code, headers, body = step
                data = body.encode()
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = {"choices": [{"delta": {"content": "Hello"}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if kind == "ok":
                done = {"choices": [{"delta": {}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 1}}
                self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
            elif kind == "stall":
                time.sleep(step[1])
            # "cut": return without finishing; the server closes the connection
            self.close_connection = True

    return Handler


@pytest.fixture
def fault_server():
    servers = []

    def start(*steps):
        script = Script(*steps)
        server = ThreadingHTTPServer(("127.0.0.1", 0), fault_handler(script))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return get_provider("openai-compatible", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1"), script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_429_storm_is_retried_honouring_retry_after(fault_server):
    provider, script = fault_server(("status", 429, {"Retry-After": "3"}, "slow down"),
                                    ("status", 429, {"Retry-After": "2"}, "slow down"), ("ok",))
    waits = []
    result = ask(provider, KEY, "q", [], 4, sleep=waits.append)
    assert result.text == "Hello" and result.attempts == 3 and result.completion_tokens == 1
    assert waits == [3.0, 2.0]


def test_persistent_500_gives_up_with_backoff(fault_server):
    provider, script = fault_server(("status", 500, {}, "boom"))
    waits = []
    with pytest.raises(CloudError, match=r"giving up after 3 attempts \(HTTP 500\)"):
        ask(provider, KEY, "q", [], 4, retries=2, sleep=waits.append)
    assert script.seen == 3 and len(waits) == 2 and waits[1] > waits[0]


def test_stalled_stream_is_an_error(fault_server):
    provider, _ = fault_server(("stall", 3.0))
    with pytest.raises(CloudError, match="stalled"):
        ask(provider, KEY, "q", [], 4, stall_timeout=0.5, sleep=lambda s: None)


def test_cut_stream_is_an_error(fault_server):
    provider, _ = fault_server(("cut",))
    with pytest.raises(CloudError, match="ended before the answer was complete"):
        ask(provider, KEY, "q", [], 4)


def test_bad_key_is_a_clear_error_that_never_shows_the_key(fault_server):
    provider, script = fault_server(("status", 401, {}, json.dumps({"message": f"bad key {KEY}"})))
    with pytest.raises(CloudError) as err:
        ask(provider, KEY, "q", [], 4, sleep=lambda s: None)
    assert "refused the API key (HTTP 401)" in str(err.value) and KEY not in str(err.value)
    assert script.seen == 1  # no retry on 401
    provider, _ = fault_server(("status", 400, {}, json.dumps({"message": f"model not found for {KEY}"})))
    with pytest.raises(CloudError) as err:
        ask(provider, KEY, "q", [], 4)
    assert "model not found" in str(err.value) and KEY not in str(err.value) and "***" in str(err.value)


def test_unreachable_endpoint_is_retried_then_reported():
    provider = get_provider("openai-compatible", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(CloudError, match="giving up after 2 attempts .connection failed"):
        ask(provider, KEY, "q", [], 4, retries=1, sleep=lambda s: None)


def test_serve_command_starts_a_loopback_endpoint(tiny_model):
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(tiny_model), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        provider = get_provider("openai-compatible", base_url=f"http://127.0.0.1:{match.group(1)}/v1")
        result = ask(provider, "any", "Say something.", [], 5)
        assert result.completion_tokens and result.completion_tokens <= 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
