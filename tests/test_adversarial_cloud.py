"""The cloud client against hostile servers on loopback (issue 16): whatever a server sends, `ask` ends in a result
or in one CloudError line, within its time and byte limits, and the API key appears in no output in any encoding;
`bench` keeps the edge results it measured and marks the cloud leg failed.

Every server here is a RawServer (tests/cloudfakes.py) writing raw bytes on 127.0.0.1. The leak check
(cloudfakes.key_forms) is written apart from the code under test. The key holds '/', '+' and '=' on purpose: its
JSON-escaped (\\/), URL-encoded and raw forms all differ.
"""

from __future__ import annotations

import base64
import codecs
import functools
import gzip
import html
import json
import time
from urllib.parse import quote

import pytest
from cloudfakes import RawServer, assert_no_secret, assert_no_secret_in, event, response, stream_head
from conftest import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketvlm.bench_device.cloud import CloudError, CloudResult, Secret, ask, check_key, get_provider

KEY = "sk-adv/0123456789+ABCDEFabcdef=="
OK_CHUNK = {"choices": [{"delta": {"content": "Hello"}, "finish_reason": None}]}
DONE_CHUNK = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 11,
                                                                            "completion_tokens": 1}}


@pytest.fixture
def hostile():
    servers = []

    def start(behave, provider="openai-compatible"):
        server = RawServer(behave)
        servers.append(server)
        return server, get_provider(provider, base_url=server.url)

    yield start
    for server in servers:
        server.close()


def one_line_error(provider, key=KEY, **options) -> CloudError:
    """ask() must raise one CloudError: one line, no key in its message or its repr."""
    options.setdefault("sleep", lambda s: None)
    with pytest.raises(CloudError) as err:
        ask(provider, key, "What is it?", [], 8, **options)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message and message.strip() == message, message
    assert_no_secret(KEY, message, repr(err.value), repr(err.value.args))
    return err.value


def ok_stream(out, *middle: bytes, head=None):
    stream_head(out, **(head or {}))
    out.write(event(OK_CHUNK))
    for raw in middle:
        out.write(raw)
    out.write(event(DONE_CHUNK) + b"data: [DONE]\n\n")


# ------------------------------------------------------------------------------------------------ the key, echoed

def _unicode_all(s):
    return "".join(f"\\u{ord(c):04x}" for c in s)


def _unicode_every_other(s):
    return "".join(f"\\u{ord(c):04X}" if i % 2 else c for i, c in enumerate(s))


def _json_body(message_json_text: str) -> str:
    """An error body whose message is given as raw JSON string content (escapes kept as the server wrote them)."""
    return '{"object": "error", "message": "' + message_json_text + '", "type": "invalid_request_error"}'


ECHOES = {
    "raw": json.dumps({"message": f"bad key {KEY}"}),
    "json slash-escaped": json.dumps({"message": f"bad key {KEY}"}).replace("/", "\\/"),
    "json unicode-escaped": _json_body("bad key " + _unicode_all(KEY)),
    "json half unicode-escaped": _json_body("bad key " + _unicode_every_other(KEY)),
    "url-encoded": json.dumps({"message": f"see https://x.invalid/?k={quote(KEY, safe='')}"}),
    "url-encoded every char": json.dumps({"message": "k=" + "".join(f"%{ord(c):02X}" for c in KEY)}),
    "html entities": json.dumps({"message": "k=" + "".join(f"&#{ord(c)};" for c in KEY)}),
    "html escaped": json.dumps({"message": "k=" + html.escape(KEY)}),
    "base64": json.dumps({"message": "k=" + base64.b64encode(KEY.encode()).decode()}),
    "base64 header": json.dumps({"message": base64.b64encode(f"Bearer {KEY}".encode()).decode()}),
    "fullwidth": json.dumps({"message": "k=" + "".join(chr(ord(c) + 0xFEE0) for c in KEY)}),
    "zero-width joined": json.dumps({"message": "k=" + "\u200b".join(KEY)}),
    "split by a newline": json.dumps({"message": f"k={KEY[:9]}\n{KEY[9:]}"}),
    "half of it": json.dumps({"message": f"key starts {KEY[:len(KEY) // 2 + 2]}"}),
    "nested error object": json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}",
                                                 "type": "invalid_request_error"}}),
    "in detail": json.dumps({"detail": f"token {KEY} unknown"}),
    "in the type": json.dumps({"message": "nope", "type": KEY}),
    "in a huge message": json.dumps({"message": "x" * 100_000 + KEY}),
    "as the whole body, not JSON": f"Authorization: Bearer {KEY}",
    # issue 31: forms a reader can still undo
    "reversed": json.dumps({"message": f"bad key {KEY[::-1]}"}),
    "hex": json.dumps({"message": f"bad key {KEY.encode().hex()}"}),
    "hex upper case": json.dumps({"message": f"bad key {KEY.encode().hex().upper()}"}),
    "rot13": json.dumps({"message": f"bad key {codecs.encode(KEY, 'rot13')}"}),
    "base64 at offset 1": json.dumps({"message": base64.b64encode(f"k{KEY}.".encode()).decode()}),
    "base64 at offset 2": json.dumps({"message": base64.b64encode(f"k={KEY}".encode()).decode()}),
    "url-safe base64 at offset 1": json.dumps({"message": "t=" + base64.urlsafe_b64encode(f"~{KEY}".encode())
                                               .decode()}),
    "base64 after base64-like text": json.dumps({"message": "tokenA" + base64.b64encode(f"xy{KEY}".encode())
                                                 .decode()}),
    "hex after a hex digit": json.dumps({"message": "id=a" + KEY.encode().hex()}),
}


@pytest.mark.parametrize("status", [400, 404, 422])
@pytest.mark.parametrize("echo", sorted(ECHOES))
def test_key_echoed_in_an_error_body_never_shows(hostile, echo, status):
    server, provider = hostile(lambda req, out, n: response(out, status, ECHOES[echo],
                                                            {"Content-Type": "application/json"}))
    err = one_line_error(provider)
    assert f"HTTP {status}" in str(err) and len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_key_echoed_in_headers_of_a_refusal_never_shows(hostile, status):
    headers = {"WWW-Authenticate": f'Bearer error="invalid_token", token="{KEY}"', "X-Echo": f"Bearer {KEY}",
               "Content-Type": "application/json"}
    server, provider = hostile(lambda req, out, n: response(out, status, json.dumps({"message": KEY}), headers))
    err = one_line_error(provider)
    assert err.reason == "auth" and "refused the API key" in str(err) and len(server.requests) == 1


def test_key_in_retry_after_and_headers_of_a_429_is_only_a_wait(hostile):
    def behave(req, out, n):
        if n == 0:
            response(out, 429, json.dumps({"message": KEY}), {"Retry-After": KEY, "X-Key": KEY})
        else:
            ok_stream(out)

    _, provider = hostile(behave)
    waits = []
    result = ask(provider, KEY, "q", [], 4, sleep=waits.append)
    assert result.text == "Hello" and len(waits) == 1 and 0 <= waits[0] <= 1  # unparseable: the first backoff


def _content(text_json: str) -> bytes:
    return event(('{"choices": [{"delta": {"content": "' + text_json + '"}, "finish_reason": null}]}').encode())


@pytest.mark.parametrize("encoded", [KEY.replace("/", "\\/"), _unicode_all(KEY), _unicode_every_other(KEY)])
def test_key_in_the_streamed_answer_is_redacted(hostile, encoded):
    _, provider = hostile(lambda req, out, n: ok_stream(out, _content(f"your key is {encoded} ok")))
    result = ask(provider, KEY, "q", [], 4)
    assert result.text == "Helloyour key is *** ok"
    assert_no_secret(KEY, repr(result))


@pytest.mark.parametrize("encoded", ["".join(f"%{ord(c):02x}" for c in KEY),
                                     "&#" + ";&#".join(str(ord(c)) for c in KEY) + ";"])
def test_key_encoded_in_the_answer_fails_the_answer(hostile, encoded):
    _, provider = hostile(lambda req, out, n: ok_stream(out, _content(encoded)))
    assert one_line_error(provider).reason == "bad_answer"


def test_key_as_the_model_name_or_in_an_error_event_never_shows(hostile):
    named = {"model": KEY, **OK_CHUNK}
    _, provider = hostile(lambda req, out, n: ok_stream(out, event(named)))
    result = ask(provider, KEY, "q", [], 4)
    assert result.model == provider.model
    _, provider = hostile(lambda req, out, n: ok_stream(out, event({"object": "error", "message": f"no {KEY}"})))
    assert "reported an error in the stream" in str(one_line_error(provider))


# ------------------------------------------------------------------------------------------------ malformed keys

@pytest.mark.parametrize("bad", [f"{KEY[:8]} {KEY[8:]}", f"{KEY[:8]}\t{KEY[8:]}", f"{KEY[:8]}\n{KEY[8:]}",
                                 f"{KEY}\x00", f"{KEY}\x7f", f"{KEY}é", f"{KEY[:8]}\u2028{KEY[8:]}",
                                 f"{KEY[:8]}\r\nX-Evil: 1"])
def test_a_key_a_header_cannot_carry_is_one_line_and_is_never_sent(hostile, bad):
    server, provider = hostile(lambda req, out, n: ok_stream(out))
    err = one_line_error(provider, key=bad)
    assert "not usable" in str(err) and not server.requests
    for fragment in (KEY[:8], KEY[8:]):
        assert fragment not in str(err)


@pytest.mark.parametrize("padded", [f"{KEY}\n", f"  {KEY}\r\n", f"\t{KEY} "])
def test_surrounding_whitespace_is_stripped_before_the_header(hostile, padded):
    server, provider = hostile(lambda req, out, n: ok_stream(out))
    assert ask(provider, padded, "q", [], 4).text == "Hello"
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_a_base_url_with_credentials_or_controls_is_refused_without_echoing_it():
    for url in (f"http://user:{KEY}@127.0.0.1:9/v1", "http://127.0.0.1:9/v1\r\nX-Evil: 1", "ftp://127.0.0.1/v1",
                "http://127.0.0.1:99999/v1", f"http://127.0.0.1:9/v1?key={KEY}"):
        err = one_line_error(get_provider("openai-compatible", base_url=url))
        assert err.reason == "config"


# ------------------------------------------------------------------------------------------------ headers and retries

@pytest.mark.parametrize("retry_after", ["soon-ish", "", "   ", "-5", "nan", "inf", "-inf", "1e309", "9" * 400,
                                         "Mon, 99 Foo 2026 99:99:99 GMT", "Wed, 21 Oct 2015 07:28:00 GMT",
                                         "Fri, 31 Dec 9999 23:59:59 GMT", "0x10", "\u00e9t\u00e9"])
def test_any_retry_after_gives_a_bounded_wait(hostile, retry_after):
    def behave(req, out, n):
        if n < 2:
            response(out, 429 if n == 0 else 503, "slow down", {"Retry-After": retry_after.encode().decode("latin-1")})
        else:
            ok_stream(out)

    _, provider = hostile(behave)
    waits = []
    result = ask(provider, KEY, "q", [], 4, sleep=waits.append, max_wait=7.0)
    assert result.text == "Hello" and result.attempts == 3
    assert len(waits) == 2 and all(0 <= w <= 7.0 for w in waits)


def test_a_500_loop_gives_up_after_the_retries(hostile):
    server, provider = hostile(lambda req, out, n: response(out, 500, "x" * 200_000))
    waits = []
    err = one_line_error(provider, retries=3, sleep=waits.append, max_wait=2.0)
    assert "giving up after 4 attempts (HTTP 500)" in str(err) and len(server.requests) == 4
    assert len(waits) == 3 and all(0 < w <= 2.0 for w in waits)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed(hostile, status):
    # a follow would connect to example.com: the network guard fails the test if anything tries
    where = f"http://example.com/steal?key={quote(KEY)}"
    server, provider = hostile(lambda req, out, n: response(out, status, "", {"Location": where}))
    err = one_line_error(provider)
    assert err.reason == "redirect" and len(server.requests) == 1 and "example.com" not in str(err)


@functools.lru_cache(maxsize=None)
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (64 * 2**20), compresslevel=1)  # 64 MiB of zeros in a few hundred KiB


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, gzip"])
def test_a_compressed_answer_is_refused_not_inflated(hostile, encoding):
    bomb = _gzip_bomb()

    def behave(req, out, n):
        stream_head(out, headers={"Content-Encoding": encoding})
        out.write(bomb)

    server, provider = hostile(behave)
    err = one_line_error(provider)
    assert "compressed" in str(err) and server.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("ctype", ["text/html", "text/plain", "application/octet-stream", "image/png",
                                   "multipart/mixed; boundary=x"])
def test_a_wrong_content_type_is_one_line(hostile, ctype):
    _, provider = hostile(lambda req, out, n: ok_stream(out, head={"content_type": ctype}))
    assert "not an event stream" in str(one_line_error(provider))


def test_a_whole_json_answer_instead_of_a_stream_is_read(hostile):
    whole = {"model": "m", "choices": [{"message": {"content": "Whole answer"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    _, provider = hostile(lambda req, out, n: response(out, 200, json.dumps(whole),
                                                       {"Content-Type": "application/json"}))
    result = ask(provider, KEY, "q", [], 4)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Whole answer", 5, 2)


def test_an_event_stream_with_a_charset_is_a_stream(hostile):
    _, provider = hostile(lambda req, out, n: ok_stream(out, head={"content_type": "text/event-stream; charset=utf-8"}))
    assert ask(provider, KEY, "q", [], 4).text == "Hello"


RAW_GARBAGE = {
    "bad status line": b"HTTX/9 abc\r\n\r\n",
    "nothing at all": b"",
    "binary noise": bytes(range(256)) * 4,
    "a header flood": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
    "one endless header": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("garbage", sorted(RAW_GARBAGE))
def test_protocol_garbage_is_retried_then_one_line(hostile, garbage):
    server, provider = hostile(lambda req, out, n: out.write(RAW_GARBAGE[garbage]))
    err = one_line_error(provider, retries=1)
    assert "giving up after 2 attempts (connection failed" in str(err) and len(server.requests) == 2


def test_a_broken_chunked_stream_is_cut(hostile):
    def behave(req, out, n):
        out.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = event(OK_CHUNK)
        out.write(b"%x\r\n%s\r\nzz-not-hex\r\n" % (len(chunk), chunk))

    _, provider = hostile(behave)
    assert one_line_error(provider).reason == "cut"


def test_a_short_content_length_is_one_line(hostile):
    def behave(req, out, n):
        out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"choi")

    _, provider = hostile(behave)
    one_line_error(provider)


# ------------------------------------------------------------------------------------------------ stream shapes

BAD_EVENTS = {
    "an array": b"[]",
    "a string": b'"text"',
    "a number": b"42",
    "null": b"null",
    "true": b"true",
    "not JSON": b"{not json",
    "truncated JSON": b'{"choices": [{"delta": {"content": "Hel',
    "choices a string": b'{"choices": "x"}',
    "a choice a number": b'{"choices": [1]}',
    "delta a list": b'{"choices": [{"delta": []}]}',
    "content a number": b'{"choices": [{"delta": {"content": 5}}]}',
    "content an object": b'{"choices": [{"delta": {"content": {"a": 1}}}]}',
    "usage a string": b'{"usage": "lots"}',
    "completion_tokens a string": b'{"usage": {"prompt_tokens": 3, "completion_tokens": "12"}}',
    "prompt_tokens negative": b'{"usage": {"prompt_tokens": -1}}',
    "prompt_tokens a fraction": b'{"usage": {"prompt_tokens": 1.5}}',
    "completion_tokens a bool": b'{"usage": {"completion_tokens": true}}',
    "completion_tokens huge": b'{"usage": {"completion_tokens": 10000000000000}}',
    "completion_tokens infinite": b'{"usage": {"completion_tokens": Infinity}}',
    "an error object": b'{"error": {"message": "overloaded"}}',
}


@pytest.mark.parametrize("bad", sorted(BAD_EVENTS))
def test_a_malformed_stream_event_is_one_line(hostile, bad):
    _, provider = hostile(lambda req, out, n: ok_stream(out, event(BAD_EVENTS[bad])))
    err = one_line_error(provider)
    assert err.reason in ("bad_answer", "server")


def test_bad_utf8_is_replaced_not_fatal(hostile):
    bad = b'{"choices": [{"delta": {"content": "caf\xe9 \xff\xfe"}}]}'
    _, provider = hostile(lambda req, out, n: ok_stream(out, event(bad)))
    result = ask(provider, KEY, "q", [], 4)
    assert result.text.startswith("Hellocaf\ufffd") and result.completion_tokens == 1


def test_an_endless_stream_stops_at_the_size_cap(hostile):
    def behave(req, out, n):
        stream_head(out)
        for _ in range(200_000):  # far past the cap; the client hangs up first
            out.write(event(OK_CHUNK))

    _, provider = hostile(behave)
    err = one_line_error(provider, max_bytes=256 * 1024)
    assert "went past 256 KiB" in str(err)


def test_endless_keepalive_comments_stop_at_the_size_cap(hostile):
    def behave(req, out, n):
        stream_head(out)
        for _ in range(500_000):
            out.write(b": ping\n")

    _, provider = hostile(behave)
    assert "went past" in str(one_line_error(provider, max_bytes=128 * 1024))


def test_one_endless_line_stops_at_the_line_cap(hostile):
    def behave(req, out, n):
        stream_head(out)
        out.write(b"data: " + b"x" * (3 * 2**20))

    _, provider = hostile(behave)
    assert "line longer than" in str(one_line_error(provider))


def test_a_slow_drip_stops_at_the_total_timeout(hostile):
    def behave(req, out, n):
        stream_head(out)
        for _ in range(2000):  # a byte every 20 ms: never silent long enough to stall
            out.write(b":")
            out.flush()
            time.sleep(0.02)

    _, provider = hostile(behave)
    err = one_line_error(provider, stall_timeout=5.0, total_timeout=0.5)
    assert "total timeout" in str(err) and err.reason == "timeout"  # time, not size ("too_long")


@pytest.mark.parametrize("head", ["endless 100 Continue", "a dripped status line", "dripped headers"])
def test_a_response_head_that_never_ends_stops_at_the_total_timeout(hostile, head):
    def behave(req, out, n):
        if head == "endless 100 Continue":
            for _ in range(100_000):
                out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                out.flush()
                time.sleep(0.001)
            return
        if head == "dripped headers":
            out.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(3000):  # a byte every 10 ms: each read is quick, the head never completes
            out.write(b"X" if head == "dripped headers" else b"H")
            out.flush()
            time.sleep(0.01)

    server, provider = hostile(behave)
    err = one_line_error(provider, timeout=5.0, total_timeout=0.6)
    assert err.reason == "timeout" and "total timeout" in str(err) and len(server.requests) == 1


def test_a_server_that_never_answers_is_retried_then_one_line(hostile):
    server, provider = hostile(lambda req, out, n: time.sleep(2))
    err = one_line_error(provider, timeout=0.3, retries=1)
    assert "giving up after 2 attempts (no response within 0.3s)" in str(err) and len(server.requests) == 2


def test_silence_after_the_head_is_a_stall(hostile):
    def behave(req, out, n):
        stream_head(out)
        time.sleep(3)

    _, provider = hostile(behave)
    assert one_line_error(provider, stall_timeout=0.3).reason == "stalled"


# ------------------------------------------------------------------------------------------------ property-based

KEYS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=16, max_size=64)


def _encode(key: str, how: str, picks: list[bool]) -> str:
    pick = (picks * (len(key) // max(1, len(picks)) + 1))[:len(key)] if picks else [True] * len(key)
    if how == "json":
        return json.dumps(key)[1:-1]
    if how == "json slash":
        return json.dumps(key)[1:-1].replace("/", "\\/")
    if how == "unicode some":
        return "".join(f"\\u{ord(c):04x}" if p else c for c, p in zip(key, pick))
    if how == "percent some":
        return "".join(f"%{ord(c):02X}" if p else c for c, p in zip(key, pick))
    if how == "entities some":
        return "".join(f"&#{ord(c)};" if p else c for c, p in zip(key, pick))
    if how == "fullwidth":
        return "".join(chr(ord(c) + 0xFEE0) for c in key)
    if how == "zero-width":
        return "\u200b".join(key)
    if how == "base64":
        return base64.b64encode(key.encode()).decode()
    if how == "reversed":
        return key[::-1]
    if how in ("hex", "HEX"):
        return key.encode().hex() if how == "hex" else key.encode().hex().upper()
    if how == "rot13":
        return codecs.encode(key, "rot13")
    if how.startswith("base64 at "):  # inside a longer encoded text, starting 1 or 2 bytes into a group
        offset = int(how[-1])
        return base64.b64encode(bytes(picks[:offset]) + b"\xff" * (offset - len(picks[:offset])) + key.encode()
                                + b"!").decode()
    return key


ENCODINGS = ["raw", "json", "json slash", "unicode some", "percent some", "entities some", "fullwidth", "zero-width",
             "base64", "reversed", "hex", "HEX", "rot13", "base64 at 1", "base64 at 2"]


@settings(max_examples=400, deadline=None)
@given(key=KEYS, how=st.sampled_from(ENCODINGS), picks=st.lists(st.booleans(), max_size=8),
       before=st.text(max_size=40), after=st.text(max_size=40))
def test_scrub_never_lets_any_encoding_of_the_key_through(key, how, picks, before, after):
    assert_no_secret(key, Secret(key).scrub(before + _encode(key, how, picks) + after))


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=80))
def test_check_key_accepts_only_what_a_header_can_carry(raw):
    try:
        key = check_key(raw)
    except Exception as e:  # the only failure allowed: a one-line user error that does not show the key
        assert type(e).__name__ == "PocketVLMError" and "\n" not in str(e) and raw.strip() not in str(e)
        return
    assert key is None or (key == raw.strip() and all(0x21 <= ord(c) <= 0x7E for c in key))


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**13) | st.floats(allow_nan=True) |
                       st.text(max_size=12) | st.just(KEY),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                           st.sampled_from(["choices", "delta", "content", "usage", "prompt_tokens",
                                            "completion_tokens", "finish_reason", "model", "message", "error",
                                            "text", "object"]), inner, max_size=4), max_leaves=12)
LINES = st.one_of(JSONISH.map(lambda v: event(json.dumps(v).encode())),
                  st.binary(max_size=60).map(lambda b: b"data: " + b + b"\n"),
                  st.sampled_from([b"data: [DONE]\n\n", b": keep-alive\n", b"\n", b"event: ping\n",
                                   event(OK_CHUNK), event(DONE_CHUNK)]))


@pytest.fixture(scope="module")
def fuzz_server():
    state = {"status": 200, "body": b""}

    def behave(req, out, n):
        if state["status"] != 200:
            response(out, state["status"], state["body"])
            return
        stream_head(out)
        out.write(state["body"])

    server = RawServer(behave)
    yield state, get_provider("openai-compatible", base_url=server.url)
    server.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, max_size=12))
def test_any_stream_gives_a_result_or_one_cloud_error_line(fuzz_server, lines):
    state, provider = fuzz_server
    state["status"], state["body"] = 200, b"".join(lines)
    try:
        result = ask(provider, KEY, "q", [], 4, retries=0, stall_timeout=5.0, total_timeout=10.0)
    except CloudError as e:
        assert "\n" not in str(e)
        assert_no_secret(KEY, str(e))
        return
    assert isinstance(result, CloudResult) and isinstance(result.text, str)
    assert result.prompt_tokens is None or isinstance(result.prompt_tokens, int)
    assert_no_secret(KEY, result.text, result.model)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([400, 404, 405, 409, 413, 415, 422]), body=JSONISH)
def test_any_error_body_gives_one_line_without_the_key(fuzz_server, status, body):
    state, provider = fuzz_server
    state["status"], state["body"] = status, json.dumps(body)
    one_line_error(provider)


# ------------------------------------------------------------------------------------------------ through `bench`

def _bench(tiny_model, server, out, key, *extra):
    return run_cli("bench", tiny_model, "--runs", 1, "--warmup", 0, "--max-tokens", 2, "--cloud-base-url", server.url,
                   "--out", out, "--no-plots", "--quiet", *extra, env={"MISTRAL_API_KEY": key})


def _assert_kept_and_failed(proc, out, fragment):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    cloud_lines = [line for line in proc.stderr.splitlines() if line.startswith("pocketvlm: cloud leg:")]
    failed = [line for line in cloud_lines if fragment in line]
    assert len(failed) == 1, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["records"] and all(r["measured"] for r in results["records"])  # the edge leg, as measured
    cloud = results["cloud"][0]
    assert not cloud["measured"] and fragment in cloud["error"]
    assert fragment in (out / "report.md").read_text()
    files = assert_no_secret_in(KEY, out)
    assert {p.name for p in files} >= {"results.json", "report.md"}
    assert_no_secret(KEY, proc.stdout, proc.stderr)
    assert "Bearer" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("escape", ["slash", "unicode"])
def test_bench_never_writes_an_escaped_echo_of_the_key(tiny_model, hostile, tmp_path, escape):
    body = (json.dumps({"message": f"Invalid key {KEY}"}).replace("/", "\\/") if escape == "slash"
            else _json_body("Invalid key " + _unicode_all(KEY)))
    server, _ = hostile(lambda req, out, n: response(out, 400, body, {"Content-Type": "application/json"}))
    out = tmp_path / "out"
    _assert_kept_and_failed(_bench(tiny_model, server, out, KEY), out, "rejected the request (HTTP 400")


def test_bench_with_a_newline_key_soonish_retry_and_an_array_event(tiny_model, hostile, tmp_path):
    def behave(req, out, n):
        if n == 0:
            response(out, 429, "wait", {"Retry-After": "soon-ish"})
        else:
            ok_stream(out, event(b"[]"))

    server, _ = hostile(behave)
    out = tmp_path / "out"
    proc = _bench(tiny_model, server, out, KEY + "\n")
    _assert_kept_and_failed(proc, out, "malformed stream event")
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 2


def test_bench_with_a_string_completion_tokens(tiny_model, hostile, tmp_path):
    bad = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3,
                                                                         "completion_tokens": "12"}}
    server, _ = hostile(lambda req, out, n: (stream_head(out), out.write(event(bad) + b"data: [DONE]\n\n")))
    out = tmp_path / "out"
    _assert_kept_and_failed(_bench(tiny_model, server, out, KEY), out, "not a whole number")


@pytest.mark.parametrize("bad", [f"{KEY[:10]} {KEY[10:]}", f"{KEY[:10]}\x01{KEY[10:]}", f"{KEY}\u00e9"])
def test_bench_refuses_a_malformed_key_in_one_line_before_measuring(tiny_model, hostile, tmp_path, bad):
    server, _ = hostile(lambda req, out, n: ok_stream(out))
    out = tmp_path / "out"
    proc = _bench(tiny_model, server, out, bad)
    line = assert_user_error(proc, "$MISTRAL_API_KEY is not usable")
    assert KEY[:10] not in line and KEY[10:] not in line and not server.requests and not out.exists()


PROVIDER_FILES = {
    "missing": None,
    "empty": "",
    "not JSON": "{nope",
    "a list": "[1, 2]",
    "wrong schema": json.dumps({"schema": "pocketvlm.providers/9"}),
    "no image rules": json.dumps({"schema": "pocketvlm.providers/2", "default": "x"}),
    "binary": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("case", sorted(PROVIDER_FILES))
def test_a_bad_providers_file_is_one_line(tiny_model, tmp_path, case):
    path = tmp_path / "providers.json"
    content = PROVIDER_FILES[case]
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert_user_error(run_cli("bench", tiny_model, "--providers", path), f"providers file {path}")


def _broken_copies():
    from pocketvlm.bench_device.providers import builtin_path

    data = json.loads(builtin_path().read_text())
    m = next(iter(data["models"]))

    def mutate(fn):
        copy = json.loads(json.dumps(data))
        fn(copy)
        return copy

    return {
        "price a string": (mutate(lambda d: d["models"][m]["price"].__setitem__("input_per_m", "1.5")), "input_per_m"),
        "price negative": (mutate(lambda d: d["models"][m]["price"].__setitem__("output_per_m", -1)), "output_per_m"),
        "retired not a date": (mutate(lambda d: d["models"][m].__setitem__("retired", "soon")), "retired"),
        "unknown successor": (mutate(lambda d: d["models"][m].__setitem__("successor", "nope")), "successor"),
        "unknown endpoint": (mutate(lambda d: d["models"][m].__setitem__("endpoint", "nope")), "endpoint"),
        "unknown rule": (mutate(lambda d: d["models"][m]["image_tokens"].__setitem__("rule", "nope")), "rule"),
        "bad dialect": (mutate(lambda d: d["endpoints"]["mistral"].__setitem__("dialect", "soap")), "dialect"),
        "provider without model": (mutate(lambda d: d["providers"][d["default"]].pop("model")), "model"),
        "default unknown": (mutate(lambda d: d.__setitem__("default", "nope")), "default"),
        "patch zero": (mutate(lambda d: d["image_token_rules"]["mistral-14px"].__setitem__("patch", 0)), "patch"),
    }


@pytest.mark.parametrize("case", sorted(_broken_copies()))
def test_a_providers_file_with_a_wrong_field_names_it(tiny_model, tmp_path, case):
    data, field = _broken_copies()[case]
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(data))
    assert_user_error(run_cli("bench", tiny_model, "--providers", path), f"providers file {path}", field)


def test_a_bug_in_the_cloud_leg_keeps_the_edge_results_and_never_prints_the_key(tiny_model, tmp_path, monkeypatch):
    from pocketvlm.bench_device import bench as bench_module

    def buggy_ask(provider, key, *args, **kwargs):
        raise TypeError(f"unsupported operand for {key!r}")  # a bug whose message carries the key

    monkeypatch.setattr(bench_module.cloud_api, "ask", buggy_ask)
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as err:  # a bug is a bug: it is raised, without the key
        bench_module.bench([str(tiny_model)], runs=1, warmup=0, max_tokens=2, out=out, with_plots=False,
                           progress=False, cloud_base_url="http://127.0.0.1:9/v1")
    assert "TypeError" in str(err.value) and err.value.__cause__ is None and err.value.__context__ is not None
    import traceback

    assert_no_secret(KEY, "".join(traceback.format_exception(err.value, chain=False)))
    results = json.loads((out / "results.json").read_text())
    assert results["records"] and "internal error (TypeError)" in results["cloud"][0]["error"]
    assert_no_secret_in(KEY, out)
