"""`pocketvlm serve` against a client that means harm (issue 16): the real server on loopback, real sockets, raw
bytes where no client library would send them. Every malformed request must get a JSON error with the right status,
and the connection must stay usable or be closed cleanly; nothing a client sends may cost unbounded threads,
memory or time; only the expected Hosts, pages and keys get in. Property-based (Hypothesis) for the request parser.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from conftest import assert_user_error, draw_image, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhttp import Raw, request

from pocketvlm import media
from pocketvlm.errors import PocketVLMError
from pocketvlm.prompt import Request
from pocketvlm.runtime import server as serve
from pocketvlm.runtime.base import Backend, Step
from pocketvlm.runtime.server import BadRequest, Limits, PayloadTooLarge, decode_body, make_server, parse_request

KEY = "sk-adversary-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 2.0  # the servers' request/idle timeout here: short, so slow clients are cut off quickly


def png(width=64, height=48, seed=0) -> bytes:
    buf = io.BytesIO()
    draw_image(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(text="What color is the circle?", images=(), **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    parts.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": parts}], **extra}


def post_json(raw: Raw, body, *, headers=None, path="/v1/chat/completions", port=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw.send(request("POST", path, headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
                     body=data))
    return raw.response()


def wait_until(condition, limit: float = 20.0) -> None:
    """Poll for a state the server reaches on its own (a guard against hanging, not a timing assertion)."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "the server never got there"
        time.sleep(0.02)


class Served:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def raw(self, **kw) -> Raw:
        return Raw(self.port, **kw)

    def usable(self, raw: Raw) -> bool:
        """The connection still answers a plain request correctly."""
        raw.send(request("GET", "/v1/models", headers=AUTH))
        r = raw.response()
        return r is not None and r.status == 200 and r.json()["data"][0]["id"] == "tiny"

    def healthy(self) -> bool:
        with self.raw() as raw:
            return self.usable(raw)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served(reference):
    s = Served(make_server(reference, "127.0.0.1", 0, model_id="tiny", api_key=KEY, timeout=TIMEOUT, workers=4,
                           pixel_budget=200_000))
    yield s
    s.stop()


def assert_clean_error(served, raw: Raw, response, status: int, fragment: str = "") -> str:
    """A JSON error with this status; then the connection either still works or was closed cleanly."""
    assert response is not None, "no response at all"
    assert response.status == status, (response.status, response.body[:300])
    message = response.error_message()
    assert fragment.lower() in message.lower(), (fragment, message)
    if response.closes:
        assert raw.at_eof(), "Connection: close, but the server kept the connection open"
    else:
        assert served.usable(raw), "the connection is out of step after the error"
    return message


# ------------------------------------------------------------------------------------ protocol robustness

@pytest.mark.parametrize("body, fragment", [
    (b"[1, 2, 3]", "must be a JSON object, not a list"),
    (b'"hello"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "unpaired surrogate"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
    ('{"messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"), "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"{not json", "not valid JSON"),
])
def test_bodies_that_crashed_the_handler_are_400s(served, body, fragment):
    with served.raw() as raw:
        assert_clean_error(served, raw, post_json(raw, body), 400, fragment)


@pytest.mark.parametrize("value", ["abc", "-1", "+5", "0x10", "1e3", "5, 6", "99999999999999999999999"])
def test_content_length_that_is_not_a_byte_count_is_a_400_and_a_clean_close(served, value):
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": value}) + b"{}")
        assert_clean_error(served, raw, raw.response(), 400, "Content-Length")


def test_negative_content_length_with_a_65_mb_body_is_refused_without_reading_it(served):
    """Content-Length: -1 made the old server read to the end of the stream, past the 64 MB limit."""
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": "-1"}))
        sent = [0]

        def flood():
            block = b"x" * (1 << 20)
            try:
                for _ in range(65):
                    raw.sock.sendall(block)
                    sent[0] += 1
            except OSError:
                pass  # the server closed: what it wants

        pump = threading.Thread(target=flood, daemon=True)
        pump.start()
        response = raw.response()
        assert response.status == 400 and response.closes and "Content-Length" in response.error_message()
        pump.join(30)
    assert served.healthy()


def test_conflicting_or_ambiguous_framing_is_refused(served):
    cases = [
        ({"Content-Length": "5", "Transfer-Encoding": "chunked"}, 400, "both"),
        ({"Transfer-Encoding": "gzip"}, 501, "chunked only"),
        ({"Transfer-Encoding": "gzip, chunked"}, 501, "chunked only"),
    ]
    for headers, status, fragment in cases:
        with served.raw() as raw:
            raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, **headers}) + b"hello")
            assert_clean_error(served, raw, raw.response(), status, fragment)
    with served.raw() as raw:  # two Content-Length headers that disagree
        raw.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}")
        assert_clean_error(served, raw, raw.response(), 400, "conflicting")


@pytest.mark.parametrize("first, status", [
    ({"headers": {"Authorization": "Bearer wrong"}}, 401),
    ({"path": "/v1/no-such-route"}, 404),
    ({"body": chat(images=[png(400, 300)] * 2)}, 413),  # 240k pixels over this server's 200k budget
])
def test_keep_alive_connection_stays_in_step_after_an_error_on_a_post(served, first, status):
    """The unread body of a refused POST used to be parsed as the next request (a 400 echoing it)."""
    body = json.dumps(first.get("body", chat("hello there"))).encode()
    headers = {**AUTH, "Content-Type": "application/json", **first.get("headers", {})}
    with served.raw() as raw:
        raw.send(request("POST", first.get("path", "/v1/chat/completions"), headers=headers, body=body))
        response = raw.response()
        assert response.status == status, response.body
        assert not response.closes  # a small body is read away, the connection stays open
        assert served.usable(raw)
        assert served.usable(raw)


def test_body_over_the_limit_gets_413_then_a_clean_close(served):
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": str(65 << 20)})
                 + b'{"messages": ')
        assert_clean_error(served, raw, raw.response(), 413, "over this server's limit")


@pytest.mark.parametrize("field, value, fragment", [
    ("max_tokens", 0, "positive integer"),
    ("max_tokens", -3, "positive integer"),
    ("max_tokens", True, "positive integer"),
    ("max_tokens", False, "positive integer"),
    ("max_tokens", 2.5, "positive integer"),
    ("max_tokens", "5", "positive integer"),
    ("max_tokens", [5], "positive integer"),
    ("max_completion_tokens", 0, "positive integer"),
    ("stream", "yes", "true or false"),
    ("n", 2, "n must be 1"),
])
def test_bad_numbers_and_flags_are_400s(served, field, value, fragment):
    with served.raw() as raw:
        assert_clean_error(served, raw, post_json(raw, {**chat("hi"), field: value}), 400, fragment)


@pytest.mark.parametrize("content, fragment", [
    ([{"type": "text", "text": None}], ".text must be a string"),
    ([{"type": "text", "text": 5}], ".text must be a string"),
    ([{"type": "text"}], ".text must be a string"),
    (None, "must be a string or a list of parts"),
    ({"type": "text", "text": "hi"}, "must be a string or a list of parts"),
    ([{"type": "audio", "audio": "..."}], "unsupported content part type"),
    (["hello"], "must be an object"),
    ("   ", "question is empty"),
])
def test_malformed_content_is_a_400_not_the_question_none(served, content, fragment):
    with served.raw() as raw:
        body = {"messages": [{"role": "user", "content": content}]}
        assert_clean_error(served, raw, post_json(raw, body), 400, fragment)


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "no message with role 'user'"),
    ([{"role": None, "content": "hi"}], "role must be a string"),
    ([42], "must be an object"),
])
def test_malformed_messages_are_400s(served, messages, fragment):
    with served.raw() as raw:
        assert_clean_error(served, raw, post_json(raw, {"messages": messages}), 400, fragment)


def _expected_cut(reference, question):
    """A max_tokens that cuts the reference's own answer short (chosen from its answer, not hard-coded)."""
    full = reference.run(Request(question), 48)
    eos = reference.processor.eos_token_ids
    assert len(full.token_ids) >= 2, "the tiny model's answer is too short to cut"
    ended = full.token_ids[-1] in eos
    return len(full.token_ids) - 1, ("stop" if ended else "length"), len(full.token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_says_length_when_max_tokens_cuts_the_answer(served, reference, stream):
    question = "Tell me about the picture."
    cut, full_reason, full_len = _expected_cut(reference, question)
    for max_tokens, reason, tokens in ((cut, "length", cut), (48, full_reason, full_len)):
        with served.raw() as raw:
            response = post_json(raw, {**chat(question), "max_tokens": max_tokens, "stream": stream})
            assert response.status == 200, response.body
            if stream:
                events = [json.loads(line[6:]) for line in response.body.decode().splitlines()
                          if line.startswith("data: {")]
                final = events[-1]
                assert final["choices"][0]["finish_reason"] == reason
                assert final["usage"]["completion_tokens"] == tokens
                assert response.body.rstrip().endswith(b"data: [DONE]")
            else:
                body = response.json()
                assert body["choices"][0]["finish_reason"] == reason
                assert body["usage"]["completion_tokens"] == tokens


def test_huge_max_tokens_is_capped_by_the_context_not_an_error(served):
    with served.raw() as raw:
        response = post_json(raw, {**chat("hi"), "max_tokens": 10 ** 30})
        assert response.status == 200 and response.json()["usage"]["completion_tokens"] >= 1
        response = post_json(raw, {**chat("hi"), "max_tokens": None, "max_completion_tokens": 3})
        assert response.status == 200 and response.json()["usage"]["completion_tokens"] <= 3


def test_ten_thousand_messages_answer_the_last_user_turn(served, reference):
    history = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}"} for i in range(10_000)]
    history.append({"role": "user", "content": "Say hi"})
    with served.raw() as raw:
        response = post_json(raw, {"messages": history, "max_tokens": 4})
        assert response.status == 200, response.body
    expected = reference.run(Request("Say hi"), 4)
    assert response.json()["choices"][0]["message"]["content"] == expected.answer


@pytest.mark.parametrize("ref, status, fragment", [
    ({"detail": "high"}, 400, "needs a 'url'"),
    (42, 400, "must be a data: URL"),
    ({"url": None}, 400, "must be a data: URL"),
    ("https://example.com/cat.png", 400, "only data: URLs"),
    ("file:///etc/passwd", 400, "only data: URLs"),
    ("data:image/png;base64,@@@@", 400, "invalid base64"),
    ("data:image/png;base64,ünïcödé", 400, "invalid base64"),
    ("data:image/png;base64,AAAA", 400, "not an image"),
    ("data:image/png,rawbytes", 400, "base64-encoded"),
    ("data:text/plain;base64,aGVsbG8=", 400, "not an image type"),
    ("data:;base64,aGVsbG8=", 400, "not an image type"),
    ("data:image/png;base64" + "A" * 100, 400, "malformed data URL"),
    (data_url(png_header_only(8000, 8000)), 413, "over the budget"),
    (data_url(png_header_only(60_000, 60_000)), 413, "decompression bomb"),
    (data_url(png()[:120]), 400, "corrupt or truncated"),
])
def test_bad_images_are_refused_with_a_json_error(served, ref, status, fragment):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": ref},
                                                      {"type": "text", "text": "what is it?"}]}]}
    with served.raw() as raw:
        assert_clean_error(served, raw, post_json(raw, body), status, fragment)


def test_image_formats_beyond_what_clients_send_are_refused(served):
    buf = io.BytesIO()
    draw_image(32, 32).save(buf, format="PPM")
    with served.raw() as raw:
        assert_clean_error(served, raw, post_json(raw, chat(images=[buf.getvalue()])), 400, "a PPM image")


# ---------------------------------------------------------------------- malformed HTTP, raw, one by one

MALFORMED = [
    ("garbage line", b"HELLO\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /v1/models\r\n", 400),
    ("HTTP/2 on plain http", b"GET /v1/models HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505),
    ("bad version", b"GET /v1/models HTTP/1.x\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("no Host in HTTP/1.1", b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    ("two Host headers", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400),
    ("header without a colon", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nnonsense\r\n\r\n", 400),
    ("space before the colon", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length : 2"
                               b"\r\n\r\n{}", 400),
    ("request line of 70 KB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("header of 70 KB", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    ("150 headers", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150))
     + b"\r\n", 431),
    ("unknown method", b"BREW /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    ("TRACE", b"TRACE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    ("absolute-form target", b"GET http://127.0.0.1/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                             b"Bearer " + KEY.encode() + b"\r\n\r\n", 400),
    ("CRLF injection attempt in the path", b"GET /v1/models%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: 127.0.0.1"
                                           b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n", 404),
    ("unicode path", "GET /v1/modèles/😀 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n"
     .format(KEY).encode("utf-8"), 404),
    ("chunk size not hex", request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding": "chunked"})
     + b"zz\r\n{}\r\n0\r\n\r\n", 400),
    ("negative chunk size", request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding":
                                                                             "chunked"}) + b"-5\r\nhello\r\n0\r\n\r\n",
     400),
    ("chunk without CRLF", request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding": "chunked"})
     + b"2\r\n{}XX0\r\n\r\n", 400),
    ("chunked over 64 MB", request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding": "chunked"})
     + b"5000000\r\n", 413),
    ("GET on the chat route", request("GET", "/v1/chat/completions", headers=AUTH), 405),
    ("PUT on the chat route", request("PUT", "/v1/chat/completions", headers=AUTH, body=b"{}"), 405),
    ("DELETE a model", request("DELETE", "/v1/models/tiny", headers=AUTH), 405),
    ("HEAD", request("HEAD", "/v1/models", headers=AUTH), 405),
    ("POST without a length", request("POST", "/v1/chat/completions", headers=AUTH), 411),
    ("empty body", request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": "0"}), 400),
    ("model that is not here", request("GET", "/v1/models/gpt-4", headers=AUTH), 404),
    ("no key", request("GET", "/v1/models"), 401),
    ("Basic auth instead of Bearer", request("GET", "/v1/models", headers={"Authorization": "Basic " + KEY}), 401),
    ("a prefix of the key", request("GET", "/v1/models", headers={"Authorization": "Bearer " + KEY[:-1]}), 401),
    ("header injection in the key", request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}\x0bX"}),
     401),
]


@pytest.mark.parametrize("name, data, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_request_gets_a_json_error_and_a_sane_connection(served, name, data, status):
    with served.raw() as raw:
        raw.send(data)
        response = raw.response(head=data.startswith(b"HEAD"))
        assert response is not None, "no response"
        assert response.status == status, (response.status, response.body[:200])
        if not data.startswith(b"HEAD"):
            response.error_message()
        if response.status == 405:
            assert "allow" in response.headers
        if response.closes:
            assert raw.at_eof()
        else:
            assert served.usable(raw)
    assert "set-cookie" not in response.headers
    assert served.healthy()


def test_chunked_bodies_are_understood(served):
    body = json.dumps({**chat("Say hi"), "max_tokens": 3}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Transfer-Encoding": "chunked"})
                 + chunks + b"0\r\nX-Trailer: ok\r\n\r\n")
        response = raw.response()
        assert response.status == 200 and response.json()["usage"]["completion_tokens"] <= 3
        assert served.usable(raw)


def test_expect_100_continue_is_only_granted_to_a_request_that_will_be_read(served):
    body = json.dumps({**chat("hi"), "max_tokens": 2}).encode()
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={"Authorization": "Bearer nope",
                                                                  "Expect": "100-continue",
                                                                  "Content-Length": str(len(body))}))
        response = raw.response()
        assert response.status == 401 and response.closes  # no "100 Continue" first, and the body is not awaited
        assert raw.at_eof()
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Expect": "100-continue",
                                                                  "Content-Length": str(len(body))}))
        assert raw.response().status == 100
        raw.send(body)
        assert raw.response().status == 200


def test_pipelined_requests_are_answered_in_order(served):
    body = json.dumps({**chat("Say hi"), "max_tokens": 2}).encode()
    with served.raw() as raw:
        raw.send(request("GET", "/v1/models", headers=AUTH)
                 + request("POST", "/v1/chat/completions", headers=AUTH, body=body)
                 + request("GET", "/v1/no", headers=AUTH)
                 + request("GET", "/v1/models/tiny", headers=AUTH))
        statuses = [raw.response().status for _ in range(4)]
        assert statuses == [200, 200, 404, 200]
        assert served.usable(raw)


def test_http_1_0_is_answered_and_closed(served):
    with served.raw() as raw:
        raw.send(request("GET", "/v1/models", headers=AUTH, version="HTTP/1.0", host=None))
        response = raw.response()
        assert response.status == 200 and response.json()["data"][0]["id"] == "tiny"
        assert raw.at_eof()


# -------------------------------------------------------------------------------- slow and idle clients

def test_slowloris_gets_408_and_others_are_served_meanwhile(served):
    """Heads sent a byte at a time hold no worker: more of them than workers, and the server still answers."""
    head = request("GET", "/v1/models", headers=AUTH)
    slow = [served.raw() for _ in range(served.server.workers + 2)]
    try:
        for i in range(6):  # ~1.2 s of dribbling, within the 2 s request timeout
            for raw in slow:
                raw.send(head[i:i + 1])
            assert served.healthy()
            time.sleep(0.2)
        for raw in slow:  # then they stall: cut off with a 408 once their request timeout runs out
            response = raw.response()
            assert response.status == 408 and response.closes, response
            assert raw.at_eof()
    finally:
        for raw in slow:
            raw.close()


def test_half_sent_body_times_out_with_408(served):
    with served.raw() as raw:
        raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": "100"}) + b'{"mess')
        assert_clean_error(served, raw, raw.response(), 408, "not received in time")


def test_idle_connections_are_closed_and_hold_no_thread(served):
    assert served.healthy()  # the pool is up
    before = threading.active_count()
    idle = [served.raw() for _ in range(40)]
    try:
        assert served.healthy()
        assert threading.active_count() == before  # the pool is fixed: no thread per connection
        for raw in idle:  # each closed by the server once idle for the timeout (a read returns end of stream)
            assert raw.at_eof()
    finally:
        for raw in idle:
            raw.close()
    assert served.healthy()


def test_at_the_connection_cap_the_longest_idle_one_makes_room(reference):
    s = Served(make_server(reference, "127.0.0.1", 0, model_id="tiny", api_key=KEY, timeout=30, workers=2,
                           max_connections=4))
    try:
        idle = [s.raw() for _ in range(4)]
        time.sleep(0.3)  # let the poller accept all four
        assert s.healthy()  # a fifth connection: the oldest idle one was closed for it
        assert idle[0].at_eof()
        for raw in idle:
            raw.close()
    finally:
        s.stop()


def test_when_every_connection_is_busy_a_new_one_gets_503(reference):
    s = Served(make_server(reference, "127.0.0.1", 0, model_id="tiny", api_key=KEY, timeout=30, workers=1,
                           max_connections=1))
    try:
        with s.raw() as busy:  # a whole head, then a body that does not come: it holds the only worker
            busy.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Length": "50"}))
            time.sleep(0.3)
            with s.raw() as extra:
                response = extra.response()
                assert response.status == 503 and response.closes and response.headers.get("retry-after") == "1"
                response.error_message()
            busy.send(b" " * 50)  # the body finally arrives: a 400 (not JSON), and the server carries on
            assert busy.response().status == 400
        wait_until(lambda: s.server.open_connections == 0)  # busy's close seen: a slot is free again
        assert s.healthy()
    finally:
        s.stop()


class Chatty(Backend):
    """A backend whose every token is 64 KB of text: a stream no socket buffer holds."""

    name, quant, load_s = "chatty", "fp32", 0.0

    def __init__(self, reference):
        self.processor = reference.processor
        self.token = next(t for t in range(100) if t not in reference.processor.eos_token_ids)

    def image_features(self, enc):  # generate is replaced whole below: the engine steps never run
        raise NotImplementedError

    def prefill(self, enc, budget):
        raise NotImplementedError

    def decode(self, state, token_id, position):
        raise NotImplementedError

    def generate(self, request, max_tokens, **_):
        for i in range(max_tokens):
            yield Step(self.token, "x" * 65536, time.perf_counter(), prob=1.0, prompt_tokens=10 if i == 0 else None)


def test_a_client_that_stops_reading_a_stream_does_not_hold_the_model(reference):
    s = Served(make_server(Chatty(reference), "127.0.0.1", 0, model_id="tiny", api_key=KEY, timeout=1.0,
                           workers=2))
    try:
        body = json.dumps({**chat("Tell me everything."), "max_tokens": 1000, "stream": True}).encode()
        with s.raw() as stalled:
            stalled.send(request("POST", "/v1/chat/completions", headers=AUTH, body=body))
            assert stalled.response(head=True).status == 200  # the stream has begun; now never read it
            time.sleep(0.5)
            with s.raw() as other:  # the model is free again once the stalled write times out
                response = post_json(other, {**chat("Say hi"), "max_tokens": 2})
                assert response.status == 200 and response.json()["usage"]["completion_tokens"] == 2
    finally:
        s.stop()


# ------------------------------------------------------------------------------------ resource exhaustion

def test_pixel_budget_is_checked_from_headers_before_anything_is_decoded(served, monkeypatch):
    decoded = []
    monkeypatch.setattr(media, "open_image_bytes", lambda data, label="image": decoded.append(label))
    bombs = [png_header_only(8000, 8000)] * 4  # the 4 x 64 MP of the issue, in a ~1 KB body
    with served.raw() as raw:
        message = assert_clean_error(served, raw, post_json(raw, chat(images=bombs)), 413, "over the budget")
    assert "0.2 MP per request" in message and "--pixel-budget" in message
    assert decoded == []


def test_images_within_the_budget_add_up_per_request(served):
    small = png(200, 200)  # 40,000 pixels; the budget here is 200,000
    with served.raw() as raw:
        assert post_json(raw, {**chat(images=[small] * 5), "max_tokens": 1}).status == 200
        assert_clean_error(served, raw, post_json(raw, chat(images=[small] * 6)), 413, "6 images are 0.2 MP")


def test_images_are_decoded_under_the_same_lock_as_inference(served, monkeypatch):
    service = served.server.handler_class.service
    held = []
    real = media.open_image_bytes
    monkeypatch.setattr(media, "open_image_bytes",
                        lambda data, label="image": (held.append(service.lock.locked()), real(data, label))[1])
    with served.raw() as raw:
        assert post_json(raw, {**chat(images=[png(), png(seed=1)]), "max_tokens": 1}).status == 200
    assert held == [True, True]


def test_default_pixel_budget_follows_what_the_model_can_use(reference):
    cfg = reference.processor.config
    limits = Limits.for_backend(reference)
    assert limits.pixel_budget == max(media.MIN_PIXEL_BUDGET, media.IMAGES_WORTH * cfg.longest_edge ** 2)
    assert media.default_pixel_budget(2048) == 8 * 2048 ** 2  # SmolVLM2-256M/500M: 33.6 MP
    assert limits.max_images == cfg.context_length // (cfg.image_seq_len + 3)
    assert Limits.for_backend(reference, 123).pixel_budget == 123


def test_more_images_than_the_context_holds_are_refused_before_decoding(reference):
    limits = Limits(pixel_budget=10 ** 9, max_images=3, context_length=100)
    with pytest.raises(BadRequest, match="more than 3 images"):
        parse_request(chat(images=[png(8, 8)] * 4), limits)
    assert len(parse_request(chat(images=[png(8, 8)] * 3), limits).images) == 3


def test_header_reader_and_budget_are_usable_on_files_too(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(9000, 7000))
    header = media.read_image_header(path)
    assert (header.width, header.height, header.format) == (9000, 7000, "PNG")
    with pytest.raises(media.PixelBudgetError, match="63.0 MP"):
        media.check_pixel_budget([header], media.default_pixel_budget(512))
    assert media.check_pixel_budget([header], 63_000_000) == 63_000_000
    with pytest.raises(media.MediaError, match="no such file"):
        media.read_image_header(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------- exposure

def test_non_loopback_bind_needs_a_key_or_insecure(reference):
    with pytest.raises(PocketVLMError, match="--insecure"):
        make_server(reference, "0.0.0.0", 0)
    server = make_server(reference, "0.0.0.0", 0, insecure=True)
    server.server_close()
    server = make_server(reference, "0.0.0.0", 0, api_key=KEY)
    server.server_close()


def test_serve_refuses_0_0_0_0_without_a_key_in_one_line(tiny_model):
    line = assert_user_error(run_cli("serve", tiny_model, "--host", "0.0.0.0"), "--insecure", "POCKETVLM_API_KEY")
    assert "reachable from other machines" in line


@pytest.mark.parametrize("args, fragment", [
    (["--port", "70000"], "--port must be a number from 0 to 65535"),
    (["--port", "-1"], "--port must be a number from 0 to 65535"),
    (["--port", "eighty"], "--port must be a number"),
    (["--host", "example.com"], "--host takes an IP address"),
    (["--pixel-budget", "0"], "--pixel-budget must be a number"),
    (["--pixel-budget", "lots"], "--pixel-budget must be a number"),
    (["--workers", "0"], "--workers must be a number"),
    (["--timeout", "-5"], "--timeout must be a number"),
    (["--api-key", "has space"], "printable ASCII"),
    (["--allow-origin", "not an origin"], "not an origin"),
    (["--allow-host", "a/b"], "not a host name"),
])
def test_bad_serve_options_are_one_line_errors(tiny_model, args, fragment):
    assert_user_error(run_cli("serve", tiny_model, *args), fragment)


def _as_from_a_terminal():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # see tests/test_web.py: background jobs ignore SIGINT


class ServeProcess:
    """`pocketvlm serve` in a subprocess, as a user starts it; stopped with Ctrl-C."""

    def __init__(self, model, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(model), "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=_as_from_a_terminal)
        self.banner = [self.proc.stderr.readline()]
        match = re.search(r"on http://(\S+?):(\d+)/v1", self.banner[0])
        assert match, self.banner[0] + self.proc.stderr.read()
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, "".join(self.banner) + self.proc.stderr.read()


def test_api_key_from_the_environment_never_on_the_command_line(tiny_model):
    srv = ServeProcess(tiny_model, env={"POCKETVLM_API_KEY": KEY})
    try:
        cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read() if sys.platform.startswith("linux") else b""
        assert KEY.encode() not in cmdline
        with Raw(srv.port) as raw:
            raw.send(request("GET", "/v1/models"))
            assert raw.response().status == 401
            raw.send(request("GET", "/v1/models", headers=AUTH))
            assert raw.response().status == 200
    finally:
        code, err = srv.stop()
    assert code == 0 and "Traceback" not in err, err  # Ctrl-C: a clean exit
    assert KEY not in err and "POCKETVLM_API_KEY" in err


def test_key_comparison_is_constant_time(served, monkeypatch):
    calls = []
    real = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: (calls.append(1), real(a, b))[1])
    assert served.healthy()
    assert calls


def test_help_names_the_key_variable_and_the_guards():
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    for word in ("POCKETVLM_API_KEY", "--insecure", "--allow-host", "--allow-origin", "--pixel-budget", "ps",
                 "--workers", "--timeout", "--threads"):
        assert word in proc.stdout, word


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_serve_listens_on_ipv6_loopback(tiny_model):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured here")
    srv = ServeProcess(tiny_model, "--host", "::1")
    try:
        assert srv.host == "::1"
        with Raw(srv.port, host="::1") as raw:
            raw.send(request("GET", "/v1/models", host=f"[::1]:{srv.port}"))
            assert raw.response().status == 200
    finally:
        code, err = srv.stop()
    assert code == 0, err


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1", 200), ("localhost", 200), ("LOCALHOST:8000", 200), ("[::1]:8000", 200), ("127.0.0.1:1", 200),
    ("evil.example", 403), ("evil.example:8000", 403), ("127.0.0.1.evil.example", 403), ("localhost.evil", 403),
    ("127.0.0.2", 403), ("", 403), ("[::1", 403), ("a b", 403),
])
def test_unexpected_host_headers_are_refused(served, host, status):
    """DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    with served.raw() as raw:
        raw.send(request("GET", "/v1/models", host=host, headers=AUTH))
        response = raw.response()
        assert response.status == status, (host, response.body)
        if status == 403:
            assert "--allow-host" in response.error_message()


def test_allow_host_lets_a_reverse_proxy_name_in(reference):
    s = Served(make_server(reference, "127.0.0.1", 0, model_id="tiny", allow_hosts=["vlm.internal"]))
    try:
        for host, status in (("vlm.internal", 200), ("VLM.internal:443", 200), ("other.internal", 403)):
            with s.raw() as raw:
                raw.send(request("GET", "/v1/models", host=host))
                assert raw.response().status == status, host
    finally:
        s.stop()


def test_cross_origin_requests_are_refused_before_the_model_runs(served, monkeypatch):
    ran = []
    monkeypatch.setattr(serve, "answer", lambda *a, **k: ran.append(1))
    body = json.dumps(chat("hi")).encode()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{served.port + 1}"},  # another app on this machine
                    {"Sec-Fetch-Site": "cross-site"}):
        with served.raw() as raw:
            # text/plain: the "simple" request a page can send without a preflight
            raw.send(request("POST", "/v1/chat/completions", headers={**AUTH, "Content-Type": "text/plain",
                                                                      **headers}, body=body))
            response = raw.response()
            assert response.status == 403 and "--allow-origin" in response.error_message(), headers
            assert "access-control-allow-origin" not in response.headers
    assert ran == []
    with served.raw() as raw:  # the server's own origin is not cross-origin
        raw.send(request("GET", "/v1/models", host=f"127.0.0.1:{served.port}",
                         headers={**AUTH, "Origin": f"http://127.0.0.1:{served.port}"}))
        response = raw.response()
        assert response.status == 200 and "access-control-allow-origin" not in response.headers


def test_allow_origin_answers_preflight_and_requests_from_that_page(reference):
    page = "http://localhost:5173"
    s = Served(make_server(reference, "127.0.0.1", 0, model_id="tiny", api_key=KEY, allow_origins=[page + "/"]))
    try:
        with s.raw() as raw:
            raw.send(request("OPTIONS", "/v1/chat/completions", headers={
                "Origin": page, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}))
            pre = raw.response()
            assert pre.status == 204 and pre.headers["access-control-allow-origin"] == page
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            response = post_json(raw, {**chat("hi"), "max_tokens": 2}, headers={"Origin": page})
            assert response.status == 200 and response.headers["access-control-allow-origin"] == page
            assert response.headers["vary"] == "Origin"
            response = post_json(raw, {"messages": []}, headers={"Origin": page})  # errors carry it too: the page
            assert response.status == 400 and response.headers["access-control-allow-origin"] == page  # reads them
            raw.send(request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                         "Access-Control-Request-Method": "POST"}))
            refused = raw.response()
            assert refused.status == 403 and "access-control-allow-origin" not in refused.headers
    finally:
        s.stop()


# ------------------------------------------------------------------------ the request parser, by property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)

TINY_PNG = png(12, 10)
image_refs = st.one_of(
    st.sampled_from([data_url(TINY_PNG), {"url": data_url(TINY_PNG)}, data_url(png_header_only(5000, 5000)),
                     "data:image/png;base64,AAAA", "https://example.com/x.png", {"detail": "low"}, None]),
    st.binary(max_size=64).map(data_url),
    st.text(max_size=30),
    json_values)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"),
                           "text": st.one_of(st.text(), st.text(st.sampled_from("a \ud800\udfff\x00")), json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_refs}),
    json_values)
messages = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 5, None]),
                                  "content": st.one_of(st.text(), st.lists(parts, max_size=4), json_values)})
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(messages, max_size=4), json_values)},
    optional={"max_tokens": st.one_of(st.integers(), json_values), "stream": json_values, "n": json_values,
              "max_completion_tokens": st.one_of(st.integers(min_value=-2, max_value=10 ** 40), json_values)})
LIMITS = Limits(pixel_budget=1_000_000, max_images=3, context_length=64)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_bad_request(body):
    try:
        call = parse_request(body, LIMITS)
    except BadRequest as e:
        assert str(e) and len(str(e)) < 400  # a short message, never the client's data echoed whole
        return None
    assert call.question.strip() and call.question == call.question.strip()
    call.question.encode("utf-8")
    assert len(call.images) <= LIMITS.max_images
    assert sum(i.header.pixels for i in call.images) <= LIMITS.pixel_budget
    assert isinstance(call.max_tokens, int) and not isinstance(call.max_tokens, bool) and call.max_tokens >= 1
    assert isinstance(call.stream, bool)
    return call


@FAST
@given(json_values)
def test_any_json_value_parses_or_is_a_bad_request(body):
    _parse_or_bad_request(body)


@FAST
@given(chat_bodies)
def test_any_chat_shaped_body_parses_or_is_a_bad_request(body):
    _parse_or_bad_request(body)


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_decode_to_json_or_a_bad_request(raw):
    try:
        decode_body(raw)
    except BadRequest:
        pass


@FAST
@given(st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: TINY_PNG[:40] + b))
def test_any_bytes_give_an_image_header_or_a_media_error(data):
    try:
        header = media.read_image_header(data)
    except media.MediaError:
        return
    assert header.width >= 1 and header.height >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300) | st.lists(st.sampled_from(
    [b"GET ", b"POST ", b"/v1/models", b"/v1/chat/completions", b" HTTP/1.1", b"\r\n", b"Host: 127.0.0.1",
     b"Content-Length: ", b"12", b"-1", b"Transfer-Encoding: chunked", b"Authorization: Bearer " + KEY.encode(),
     b"{}", b"\r\n\r\n", b":", b"\x00", b"\xff"]), max_size=20).map(b"".join))
def test_any_bytes_on_the_wire_get_an_answer_or_a_clean_close(served, data):
    with served.raw(timeout=TIMEOUT * 3) as raw:
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)  # nothing more is coming
        while (response := raw.response()) is not None:
            assert 100 <= response.status < 600
            if response.status >= 400:
                response.error_message()
    assert served.healthy()


def test_parse_request_keeps_what_it_is_given():
    call = parse_request({**chat("  Which colour?  ", images=[TINY_PNG]), "max_tokens": 7, "stream": True}, LIMITS)
    assert call.question == "Which colour?" and call.max_tokens == 7 and call.stream is True
    assert [(i.label, i.header.width, i.header.height, i.header.format) for i in call.images] == \
        [("image 1", 12, 10, "PNG")]
    mistral = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": data_url(TINY_PNG)},
                                                         {"type": "text", "text": "q"}]}]}
    assert parse_request(mistral, LIMITS).images[0].header.pixels == 120
    with pytest.raises(PayloadTooLarge):
        parse_request(chat(images=[png_header_only(2000, 2000)]), LIMITS)


# ------------------------------------------------------------------------------------------ the load test

def test_load_script_runs_mixed_traffic_and_the_server_survives_it(tiny_model, tmp_path):
    """bench_device/serve_load.py for a few seconds: every request gets the status its kind must get (counts,
    not timings), the server answers normally afterwards and exits 0 on Ctrl-C."""
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "pocketvlm.bench_device.serve_load", str(tiny_model),
                           "--clients", "4", "--seconds", "5", "--workers", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and result["unexpected"] == {}
    assert result["requests"] == sum(sum(v.values()) for v in result["by_kind"].values()) > 0
    assert result["valid_requests"] > 0 and result["malformed_requests"] > 0
    for kind in ("chat", "chat+image", "stream", "models"):
        assert set(result["by_kind"].get(kind, {"missing": 1})) == {"200"}, kind
    assert result["after"]["chat_status"] == 200 and result["after"]["models_status"] == 200
    server = result["server"]
    assert server["exit_code"] == 0 and server["tracebacks"] == 0
    assert server["peak_rss_mb"] and server["threads_peak"]
    assert "requests:" in proc.stdout and "p95" in proc.stdout and proc.stdout.rstrip().endswith("OK")
