"""Hostile input on the router's surfaces (issue 31, items 5-10, 12, 13): where the key may be sent (plain http, an
unusable base URL, from a flag or a providers file), what a server's words may reach (the route line, --json, the
terminal, results files), and how long a cloud may hold anyone up (the whole-call deadline, serve's model lock, a
huge question). Every server is on loopback; the network guard (conftest) fails any test that reaches further, so
"nothing connected" is checked by every test here, and said outright where it is the point.
"""

from __future__ import annotations

import base64
import codecs
import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest
from cloudfakes import RawServer, assert_no_secret, assert_no_secret_in, event, mistral, response, stream_head
from conftest import SAMPLES, assert_user_error, run_cli
from rawhttp import Raw, request

from pocketvlm.bench_device.cloud import CloudError, ask, check_base_url, get_provider, plan_cloud
from pocketvlm.errors import PocketVLMError
from pocketvlm.router import Escalation, Fallback, Routed, escalate, for_terminal, log_line
from pocketvlm.runtime.server import Limits, PayloadTooLarge, make_server, parse_request

KEY = "sk-fallback/0123456789+ABCDEFabcdef=="
TEST_NET = "http://192.0.2.1/v1"  # TEST-NET-1 (RFC 5737): an address that is nobody's
HELDOUT = SAMPLES / "heldout" / "questions.json"


@pytest.fixture
def servers():
    started = []

    def start(behave):
        server = RawServer(behave)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def ok_answer(out, text="from the cloud"):
    stream_head(out)
    out.write(event({"choices": [{"delta": {"content": text}, "finish_reason": None}]}))
    out.write(event({"choices": [{"delta": {}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 3}}) + b"data: [DONE]\n\n")


def routed_ask(tiny_model, image, url, *extra, json_out=True):
    return run_cli("ask", tiny_model, "What color is the circle?", "--image", image, *(["--json"] if json_out else []),
                   "--fallback", "openai-compatible", "--fallback-base-url", url, "--fallback-model", "m",
                   "--min-confidence", "1", *extra, env={"OPENAI_API_KEY": KEY}, timeout=240)


# ------------------------------------------------------------------------------ 5, 13: where the key may go

UNUSABLE = {  # URL -> what the one line says (never the URL itself: it may hold a password)
    "plain http to another host": (TEST_NET, "--allow-plain-http"),
    "ftp": ("ftp://127.0.0.1/v1", "ftp:// is not supported"),
    "port 99999": ("http://127.0.0.1:99999/v1", "a port from 1 to 65535"),
    "credentials": ("http://user:hunter2secret@127.0.0.1:8000/v1", "user name or password"),
    "no host": ("http:///v1", "no host"),
    "a space": ("http://127.0.0.1:8000/v 1", "a space"),
    "no scheme": ("127.0.0.1:8000/v1", "want https://"),
    "a query": ("https://api.example.com/v1?key=abc", "no ?query"),
}


def _command(kind, tiny_model, url, tmp_path):
    fallback = ["--fallback", "openai-compatible", "--fallback-base-url", url]
    return {"ask": ("ask", tiny_model, "What is it?", *fallback),
            "serve": ("serve", tiny_model, "--port", "0", *fallback),
            "bench router": ("bench", "router", tiny_model, *fallback, "--quiet"),
            "bench": ("bench", tiny_model, "--runs", 1, "--warmup", 0, "--max-tokens", 2, "--cloud-base-url", url,
                      "--quiet")}[kind]


@pytest.mark.parametrize("case", sorted(UNUSABLE))
@pytest.mark.parametrize("kind", ["ask", "serve", "bench router", "bench"])
def test_an_unusable_base_url_is_one_line_naming_the_flag_before_anything_runs(tiny_model, tmp_path, kind, case):
    url, fragment = UNUSABLE[case]
    flag = "--cloud-base-url" if kind == "bench" else "--fallback-base-url"
    # serve would otherwise start and never exit: the timeout turns that into a failure, not a hang
    proc = run_cli(*_command(kind, tiny_model, url, tmp_path), env={"OPENAI_API_KEY": KEY, "MISTRAL_API_KEY": KEY},
                   timeout=120)
    line = assert_user_error(proc, flag, fragment)
    assert "hunter2secret" not in line and KEY not in proc.stderr + proc.stdout


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://127.200.3.4/v1", "http://localhost:8000/v1",
                                 "http://LOCALHOST/v1", "http://[::1]:8000/v1", "https://api.example.com/v1",
                                 "https://192.0.2.1:8443/v1/"])
def test_https_anywhere_and_plain_http_to_this_machine_need_no_opt_in(url):
    assert check_base_url(url, "--x") == url


@pytest.mark.parametrize("url", [TEST_NET, "http://10.0.0.5:8000/v1", "http://example.com/v1", "http://127.1/v1",
                                 "http://2130706433/v1", "http://localhost.example.com/v1", "http://[::2]/v1"])
def test_plain_http_to_anything_not_plainly_this_machine_needs_the_opt_in(url):
    with pytest.raises(PocketVLMError, match="--allow-plain-http"):
        check_base_url(url, "--x")
    assert check_base_url(url, "--x", allow_plain_http=True) == url


class RecordingConnection:
    """Stands in for http.client.HTTPConnection: records where it was asked to connect, connects nowhere."""

    made: list = []

    def __init__(self, host, port=None, timeout=None):
        self.made.append((host, port))

    def connect(self):
        raise ConnectionRefusedError("not really")

    def close(self):
        pass


def test_the_client_refuses_plain_http_to_another_host_before_connecting(monkeypatch):
    RecordingConnection.made = []
    monkeypatch.setattr(http.client, "HTTPConnection", RecordingConnection)
    provider = get_provider("openai-compatible", base_url=TEST_NET)
    with pytest.raises(CloudError) as err:
        ask(provider, KEY, "q", [], 4, retries=0, sleep=lambda s: None)
    assert err.value.reason == "config" and "--cloud-base-url" in str(err.value) and "unencrypted" in str(err.value)
    assert RecordingConnection.made == []  # nothing was even set up to connect
    # the opt-in lets the same URL through to the connection (here a recording stand-in, never the network)
    with pytest.raises(CloudError, match="connection failed"):
        ask(provider, KEY, "q", [], 4, retries=0, sleep=lambda s: None, allow_plain_http=True)
    assert RecordingConnection.made == [("192.0.2.1", None)]


def test_serve_with_the_opt_in_starts_and_says_where_questions_go(tiny_model):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(tiny_model), "--port", "0", "--fallback",
                             "openai-compatible", "--fallback-base-url", TEST_NET, "--allow-plain-http"],
                            stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "OPENAI_API_KEY": KEY})
    try:
        lines = []
        while not any(TEST_NET in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"serve exited: {''.join(lines)}"
            lines.append(line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_opt_in_without_a_fallback_is_refused(tiny_model):
    assert_user_error(run_cli("ask", tiny_model, "q", "--allow-plain-http"), "need --fallback")
    assert_user_error(run_cli("ask", tiny_model, "q", "--fallback-timeout", "5"), "need --fallback")


def _providers_file(tmp_path, base_url):
    from pocketvlm.bench_device.providers import builtin_path

    data = json.loads(builtin_path().read_text())
    data["endpoints"]["openai-compatible"]["base_url"] = base_url
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(data))
    return path


def test_a_providers_files_base_url_is_held_to_the_same_rules(tiny_model, tmp_path):
    field = "endpoints.openai-compatible.base_url"
    path = _providers_file(tmp_path, TEST_NET)
    line = assert_user_error(run_cli("ask", tiny_model, "q", "--fallback", "openai-compatible", "--providers", path,
                                     env={"OPENAI_API_KEY": KEY}), f"providers file {path}: {field}",
                             "--allow-plain-http")
    assert "unencrypted" in line
    assert plan_cloud("openai-compatible", path=path, allow_plain_http=True).call.base_url == TEST_NET
    assert_user_error(run_cli("bench", tiny_model, "--cloud", "openai-compatible", "--providers", path),
                      f"providers file {path}: {field}")
    for bad, fragment in (("ftp://127.0.0.1/v1", "ftp://"), ("http://u:hunter2secret@127.0.0.1/v1", "password")):
        path = _providers_file(tmp_path, bad)
        line = assert_user_error(run_cli("bench", tiny_model, "--cloud", "openai-compatible", "--providers", path),
                                 f"providers file {path}: {field}", fragment)
        assert "hunter2secret" not in line


# ------------------------------------------------------------------------------ 6: a server's words

def _other_forms(key: str) -> dict[str, str]:
    raw = key.encode()
    return {"reversed": key[::-1], "hex": raw.hex(), "HEX": raw.hex().upper(), "rot13": codecs.encode(key, "rot13"),
            "base64 at 1": base64.b64encode(b"k" + raw + b"!!").decode(),
            "base64 at 2": base64.b64encode(b"k=" + raw).decode(),
            "url-safe base64 at 1": base64.urlsafe_b64encode(b"~" + raw).decode()}


@pytest.mark.parametrize("form", sorted(_other_forms(KEY)))
def test_the_key_in_other_forms_in_an_error_or_an_answer_never_shows(servers, form):
    echoed = _other_forms(KEY)[form]
    server = servers(lambda req, out, n: response(out, 400, json.dumps({"message": f"bad key {echoed} here"}),
                                                  {"Content-Type": "application/json"}))
    provider = get_provider("openai-compatible", base_url=server.url)
    with pytest.raises(CloudError) as err:
        ask(provider, KEY, "q", [], 4, sleep=lambda s: None)
    assert "HTTP 400" in str(err.value) and "bad key" in str(err.value)  # the short message still shows
    assert_no_secret(KEY, str(err.value), err.value.plain)
    server = servers(lambda req, out, n: ok_answer(out, f"your key is {echoed} ok"))
    try:
        text = ask(get_provider("openai-compatible", base_url=server.url), KEY, "q", [], 4).text
    except CloudError as e:  # refused whole: also fine, as long as it does not show
        text = str(e)
    assert_no_secret(KEY, text)


def test_the_route_line_and_json_reason_show_a_short_scrubbed_message(tiny_model, image_file, servers):
    forms = " ".join(_other_forms(KEY).values())
    server = servers(lambda req, out, n: response(out, 400, json.dumps({"error": {"message": f"Bad key {forms}"}}),
                                                  {"Content-Type": "application/json"}))
    proc = routed_ask(tiny_model, image_file, server.url)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["route"] == "device" and "HTTP 400" in got["reason"] and "Bad key" in got["reason"]
    route = [line for line in proc.stderr.splitlines() if "route: device" in line]
    assert len(route) == 1 and "HTTP 400" in route[0]
    assert_no_secret(KEY, proc.stdout, proc.stderr)


def test_results_files_keep_no_server_text(tiny_model, servers, tmp_path):
    """bench's results.json and report.md: the status and our own words; the terminal: also the short message."""
    said = "SERVER-WORDS " + KEY[::-1]
    server = servers(lambda req, out, n: response(out, 422, json.dumps({"message": said}),
                                                  {"Content-Type": "application/json"}))
    out = tmp_path / "out"
    proc = run_cli("bench", tiny_model, "--runs", 1, "--warmup", 0, "--max-tokens", 2, "--cloud", "openai-compatible",
                   "--cloud-base-url", server.url, "--out", out, "--no-plots", "--quiet", env={"OPENAI_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    cloud = json.loads((out / "results.json").read_text())["cloud"][0]
    assert not cloud["measured"] and "rejected the request (HTTP 422)" in cloud["error"]
    for path in out.rglob("*"):
        if path.is_file():
            assert b"SERVER-WORDS" not in path.read_bytes(), path
    assert "SERVER-WORDS" in proc.stderr  # where a person reads it, short and scrubbed
    assert_no_secret_in(KEY, out)
    assert_no_secret(KEY, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------ 7: the terminal

ESCAPES = "Red\x1b[2J\x1b]0;owned\x07 circle\x9b31m\x1b]52;c;ZXZpbA==\x1b\\ \x00on\r\nnoise\tdone\x7f."


def test_for_terminal_keeps_text_newlines_and_tabs_only():
    assert for_terminal(ESCAPES) == "Red circle31m on\nnoise\tdone."
    assert for_terminal("plain text\nline two\tcol") == "plain text\nline two\tcol"
    assert for_terminal("caf\u00e9 \u2014 \U0001F600") == "caf\u00e9 \u2014 \U0001F600"  # text is not a control
    kept = Routed("x", "device", 0.1, 0.5, "confidence 0.1 < 0.5, but the cloud failed (\x1b[31mboom\x1b]0;t\x07)",
                  SimpleNamespace(answer="x"))
    line = log_line(kept, 0)
    assert "\x1b" not in line and "\x07" not in line and "boom" in line and "\n" not in line


def test_a_cloud_answer_reaches_the_terminal_without_controls_and_json_unchanged(tiny_model, image_file, servers):
    server = servers(mistral(KEY, {"m"}, answer=ESCAPES))
    plain = routed_ask(tiny_model, image_file, server.url, json_out=False)
    assert plain.returncode == 0, plain.stderr
    assert "route: cloud" in plain.stderr
    for c in "\x1b\x9b\x07\r\x00\x7f":
        assert c not in plain.stdout and c not in plain.stderr, repr(c)
    assert "on\nnoise\tdone." in plain.stdout
    js = routed_ask(tiny_model, image_file, server.url)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["answer"] == ESCAPES  # --json is faithful (JSON escapes the controls itself)
    assert "\x1b" not in js.stdout


# ------------------------------------------------------------------------------ 8: serve's lock

def test_a_silent_cloud_does_not_hold_the_model_lock(reference, servers):
    release, locked = threading.Event(), []
    answer = mistral(KEY, {"m"}, answer="from the cloud")
    state = {}

    def behave(req, out, n):
        if n == 0:  # the first escalated request: the cloud goes silent until the test says
            locked.append(state["service"].lock.locked())
            release.wait(60)
        answer(req, out, n)

    cloud = servers(behave)
    plan = plan_cloud("openai-compatible", base_url=cloud.url, model="m")
    fallback = Fallback(plan, KEY, min_confidence=1.0, timeout=120.0)
    server = make_server(reference, "127.0.0.1", 0, model_id="tiny", fallback=fallback, workers=4)
    state["service"] = server.handler_class.service
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]

    def post(raw, text):
        body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
        raw.send(request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=body))
        return raw.response()

    first = {}

    def ask_first():
        with Raw(port, timeout=90) as raw:
            first["response"] = post(raw, "What color is the circle?")

    thread = threading.Thread(target=ask_first)
    try:
        thread.start()
        end = time.monotonic() + 60
        while not locked:  # the first request is at the cloud (a guard against hanging, not a timing assertion)
            assert time.monotonic() < end and thread.is_alive(), "the first request never reached the cloud"
            time.sleep(0.02)
        with Raw(port, timeout=30) as raw:  # with the lock held by the first, this would wait as long as it does
            second = post(raw, "How many squares are there?")
        assert second.status == 200, second.body[:300]
        assert second.json()["pocketvlm"]["route"] == "cloud" and thread.is_alive() and not first
        assert locked == [False]  # the lock was free while the cloud was being waited for
    finally:
        release.set()
        thread.join(60)
        server.shutdown()
        server.server_close()
    assert first["response"].status == 200
    reply = first["response"].json()
    assert reply["pocketvlm"]["route"] == "cloud" and reply["choices"][0]["message"]["content"] == "from the cloud"


# ------------------------------------------------------------------------------ 9: the whole-call deadline

def _drip(stop):
    def behave(req, out, n):
        stream_head(out)
        for _ in range(600):  # a byte a second: never a stall, never an answer
            if stop.wait(1.0):
                return
            out.write(b":")
            out.flush()
    return behave


def _continue(stop):
    def behave(req, out, n):
        while not stop.wait(0.1):
            out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            out.flush()
    return behave


def _silent(stop):
    def behave(req, out, n):
        stop.wait(600)
    return behave


@pytest.mark.parametrize("kind", [_drip, _continue, _silent])
def test_the_cloud_call_ends_at_the_fallback_timeout_and_the_device_answer_stays(servers, kind):
    stop = threading.Event()
    cloud = servers(kind(stop))
    fallback = Fallback(plan_cloud("openai-compatible", base_url=cloud.url, model="m"), KEY, min_confidence=1.0,
                        timeout=2.0)
    kept = Routed("on the device", "device", 0.2, 1.0, "confidence 0.200 < 1", SimpleNamespace(answer="on the device"))
    start = time.monotonic()
    try:
        routed = escalate(Escalation(kept, "q", []), fallback, 4)
    finally:
        stop.set()
    assert time.monotonic() - start < 15  # generous: the deadline is 2 s, the server would go on for minutes
    assert routed.route == "device" and routed.answer == "on the device"
    assert "the cloud timed out" in routed.reason and "2s" in routed.reason and cloud.requests


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "601", "abc", "1e400"])
def test_the_fallback_timeout_is_a_bounded_number_of_seconds(tiny_model, value):
    line = assert_user_error(run_cli("ask", tiny_model, "q", "--fallback", "openai-compatible", "--fallback-timeout",
                                     value), "argument --fallback-timeout")  # a known flag, refused for its value
    assert "is not a number of seconds" in line if value == "abc" else "more than 0 and at most 600" in line


def test_ask_with_a_dripping_cloud_keeps_the_device_answer_and_says_it_timed_out(tiny_model, image_file, servers):
    stop = threading.Event()
    cloud = servers(_drip(stop))
    try:
        proc = routed_ask(tiny_model, image_file, cloud.url, "--fallback-timeout", "2")
    finally:
        stop.set()
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["route"] == "device" and got["answer"] == got["device_answer"] and "timed out" in got["reason"]
    assert any("route: device" in line and "timed out" in line for line in proc.stderr.splitlines())


# ------------------------------------------------------------------------------ 10: a huge question

def test_a_question_is_held_to_the_characters_the_context_could_take():
    limits = Limits(context_length=4, max_text_chars=10)
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 6},
                                                      {"type": "text", "text": "b" * 4}]}]}
    assert parse_request(chat, limits).question == "a" * 6 + " " + "b" * 4
    chat["messages"][0]["content"][1]["text"] = "b" * 5  # over the limit only together
    with pytest.raises(PayloadTooLarge, match="over 10 characters"):
        parse_request(chat, limits)
    with pytest.raises(PayloadTooLarge):
        parse_request({"messages": [{"role": "user", "content": "x" * 11}]}, limits)


def test_the_limit_follows_the_model_and_never_refuses_what_could_fit(reference):
    limits = Limits.for_backend(reference)
    vocab = reference.processor.tokenizer.get_vocab(with_added_tokens=True)
    assert limits.max_text_chars >= limits.context_length * max(len(t) for t in vocab)
    text = "word " * 40  # an ordinary question passes the size check
    assert parse_request({"messages": [{"role": "user", "content": text}]}, limits).question == text.strip()


def test_a_10_mb_question_is_refused_by_size_without_the_model_lock(reference):
    server = make_server(reference, "127.0.0.1", 0, model_id="tiny", workers=2)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    service = server.handler_class.service
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    try:
        with service.lock:  # the model is busy: a refusal by size must not need it
            with Raw(server.server_address[1], timeout=30) as raw:
                raw.send(request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 body=body))
                got = raw.response()
        assert got.status == 413, got.body[:300]
        message = got.error_message()
        assert "characters" in message and "context" in message and "\n" not in message and len(message) < 300
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ 12: bench router, cloud failing

def _samples(tmp_path, n=3):
    items = json.loads(HELDOUT.read_text())[:n]
    for item in items:
        item["image"] = str(HELDOUT.parent / item["image"])
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(items))
    return path


@pytest.mark.parametrize("fails_at", [0, 2])
def test_bench_router_keeps_the_device_rows_when_the_cloud_fails(tiny_model, servers, tmp_path, fails_at):
    said = "SERVER-WORDS " + codecs.encode(KEY, "rot13")

    def behave(req, out, n):
        if n < fails_at:  # answers that echo the key, reversed and as hex: redacted in the rows
            ok_answer(out, f"blue {KEY[::-1]} {KEY.encode().hex()}")
        else:
            response(out, 400, json.dumps({"message": said}), {"Content-Type": "application/json"})

    cloud = servers(behave)
    out = tmp_path / "sweep"
    proc = run_cli("bench", "router", tiny_model, "--samples", _samples(tmp_path), "--fallback", "openai-compatible",
                   "--fallback-base-url", cloud.url, "--fallback-model", "m", "--max-tokens", 3, "--out", out,
                   "--quiet", env={"OPENAI_API_KEY": KEY}, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pocketvlm: error:")]
    assert len(errors) == 1 and "cloud leg failed" in errors[0] and "results.json" in errors[0]
    assert len(cloud.requests) == fails_at + 1  # not asked again after it failed
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"] is None and results["cloud_accuracy"] is None
    assert "rejected the request (HTTP 400)" in results["cloud_error"]
    rows = results["rows"]
    assert len(rows) == 3 and all(isinstance(r["device_correct"], bool) and r["device_answer"] is not None
                                  for r in rows)
    assert [("cloud_answer" in r) for r in rows] == [i < fails_at for i in range(3)]
    report = (out / "report.md").read_text()
    assert "cloud leg failed" in report and "Device alone" in report
    for path in out.rglob("*"):
        if path.is_file():
            assert b"SERVER-WORDS" not in path.read_bytes(), path
    assert_no_secret_in(KEY, out)
    assert_no_secret(KEY, proc.stdout, proc.stderr)
