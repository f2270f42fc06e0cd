"""Loopback servers for the cloud client's tests, and the leak check.

RawServer answers each connection with whatever bytes a test's `behave` function writes, so a test can be any
server: Mistral's API with its real stream and error shapes (`mistral`), or a hostile one (a bad status line, a drip,
a redirect, a gzip bomb). Only 127.0.0.1; every server is closed by the test that started it.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import socketserver
import string
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote_plus


@dataclass
class Seen:
    method: str
    path: str
    headers: dict           # lower-case names
    body: dict | None


@dataclass
class RawServer:
    behave: object          # behave(request: Seen, out: BinaryIO, n: int) -> None; n counts requests from 0
    requests: list = field(default_factory=list)

    def __post_init__(self):
        server_self = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline(65537)
                if not line:
                    return
                method, path, _ = (line.decode("latin-1").split(" ", 2) + ["", ""])[:3]
                headers = {}
                while True:
                    h = self.rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = self.rfile.read(int(headers.get("content-length") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                seen = Seen(method, path, headers, body)
                n = len(server_self.requests)
                server_self.requests.append(seen)
                try:
                    server_self.behave(seen, self.wfile, n)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client hung up on us, as it should
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        # a short poll: shutdown() waits up to one poll interval, and a suite starts hundreds of these
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------ writing answers

def response(out, status: int, body: bytes | str = b"", headers: dict | None = None, reason: str = "X"):
    """One complete HTTP/1.1 response with a Content-Length, then the connection closes."""
    data = body.encode() if isinstance(body, str) else body
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    out.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)


def stream_head(out, content_type: str = "text/event-stream", headers: dict | None = None):
    head = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    out.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    out.flush()


def event(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


# ------------------------------------------------------------------------------------------------ Mistral's API

def invalid_model_body(model: str) -> str:
    """Mistral's answer to a retired or unknown id, byte for byte as its SDK tests and real reports show it."""
    return json.dumps({"object": "error", "message": f"Invalid model: {model}", "type": "invalid_model",
                       "param": None, "code": "1500"})


def mistral_chunks(model: str, answer: str, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """A streamed answer the way api.mistral.ai sends it: a role chunk, content chunks, and the usage on the
    chunk that carries finish_reason."""
    base = {"id": "cmpl-0123", "object": "chat.completion.chunk", "created": 1764547200, "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    for word in answer.split(" "):
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                             "completion_tokens": completion_tokens}})
    return chunks


def mistral(key: str, models: set[str], *, answer: str = "A red circle on noise.", prompt_tokens=1234,
            completion_tokens: int = 7, retired_status: int = 400):
    """A fake api.mistral.ai/v1/chat/completions: 401 for a wrong key, Mistral's invalid_model error for an id
    it does not serve (retired_status 404: the lifecycle page's version), else a streamed answer. prompt_tokens: a
    number, or a function of the request's JSON body (e.g. counting its image as some tokenizer would)."""
    def behave(req: Seen, out, n):
        if req.headers.get("authorization") != f"Bearer {key}":
            response(out, 401, json.dumps({"message": "Unauthorized", "request_id": "0" * 32}),
                     {"Content-Type": "application/json"})
            return
        model = (req.body or {}).get("model")
        if model not in models:
            body = invalid_model_body(model) if retired_status == 400 else json.dumps({"detail": "Not Found"})
            response(out, retired_status, body, {"Content-Type": "application/json"})
            return
        stream_head(out)
        counted = prompt_tokens(req.body) if callable(prompt_tokens) else prompt_tokens
        for chunk in mistral_chunks(model, answer, counted, completion_tokens):
            out.write(event(chunk))
        out.write(b"data: [DONE]\n\n")

    return behave


# ------------------------------------------------------------------------------------------------ leaks

_ROT13 = str.maketrans(string.ascii_lowercase + string.ascii_uppercase,
                       string.ascii_lowercase[13:] + string.ascii_lowercase[:13]
                       + string.ascii_uppercase[13:] + string.ascii_uppercase[:13])


def rot13(text: str) -> str:
    return text.translate(_ROT13)


def base64_inside(data: bytes, offset: int) -> str:
    """The characters of base64(anything + DATA + anything) that DATA alone decides, DATA starting OFFSET bytes
    into the encoded text: found by encoding it between two different fillers and keeping what both agree on."""
    a = base64.b64encode(b"\x00" * offset + data + b"\x00\x00").decode()
    b = base64.b64encode(b"\xff" * offset + data + b"\xff\xff").decode()
    same = [i for i in range(len(a)) if a[i] == b[i]]
    start = same[0]
    end = start
    while end + 1 < len(a) and a[end + 1] == b[end + 1]:
        end += 1
    return a[start:end + 1]


def key_forms(key: str) -> set[str]:
    """The key as it could appear in an output: raw, JSON-escaped (with and without \\/ and \\uXXXX), URL-encoded,
    HTML-escaped, base64 (whole, of the header value, and inside other text at each of the 3 byte offsets),
    hex (lower and upper case), reversed, rot13. Written here, apart from the code under test."""
    forms = {key, json.dumps(key)[1:-1], json.dumps(key)[1:-1].replace("/", "\\/"), quote(key, safe=""),
             quote_plus(key), html.escape(key), base64.b64encode(key.encode()).decode(),
             base64.b64encode(f"Bearer {key}".encode()).decode(),
             "".join(f"\\u{ord(c):04x}" for c in key), "".join(f"\\u{ord(c):04X}" for c in key),
             binascii.hexlify(key.encode()).decode(), binascii.hexlify(key.encode()).decode().upper(),
             "".join(reversed(key)), rot13(key)}
    for offset in range(3):
        inside = base64_inside(key.encode(), offset)
        forms |= {inside, inside.replace("+", "-").replace("/", "_")}
    return {f for f in forms if len(f) >= 6}


def _hex_runs(text: str) -> list[str]:
    """Every run of 8+ hex digits decoded, from its first digit and from its second."""
    out = []
    for run in re.findall(r"[0-9a-fA-F]{8,}", text):
        for start in (0, 1):
            digits = run[start:]
            out.append(binascii.unhexlify(digits[:len(digits) - len(digits) % 2]).decode("latin-1"))
    return out


def _base64_runs(text: str) -> list[str]:
    """Every run of 8+ base64 characters (either alphabet) decoded, from each of its first 4 characters."""
    out = []
    for run in re.findall(r"[A-Za-z0-9+/_-]{8,}", text):
        run = run.replace("-", "+").replace("_", "/")
        for start in range(4):
            chars = run[start:]
            try:
                out.append(base64.b64decode(chars[:len(chars) - len(chars) % 4]).decode("latin-1"))
            except binascii.Error:
                pass
    return out


def _decoded(text: str) -> list[str]:
    """The text as a reader could decode it: JSON escapes, percent-encoding, HTML entities, width forms, and
    invisible characters dropped, each alone and all in a row; and that backwards, rot13'd, and its hex and base64
    runs decoded."""
    def json_escapes(s):
        return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), s).replace("\\/", "/")

    def invisible(s):
        return "".join(c for c in s if unicodedata.category(c) not in ("Cf", "Cc", "Zs", "Zl", "Zp"))

    steps = (json_escapes, unquote_plus, html.unescape, lambda s: unicodedata.normalize("NFKC", s), invisible)
    views, chained = [text], text
    for step in steps:
        views.append(step(text))
        chained = step(chained)
    views.append(chained)
    for view in (text, chained):
        views += ["".join(reversed(view)), rot13(view), *_hex_runs(view), *_base64_runs(view)]
    return views


def assert_no_secret(key: str, *texts: str | bytes):
    """No form of the key, and no run of half of it (12 characters at least), in any decoding of the texts."""
    n = max(12, len(key) // 2)
    runs = {key[i:i + n] for i in range(len(key) - n + 1)}
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        for form in key_forms(key):
            assert form not in text, f"the key ({form!r} form) leaked into:\n{text[:2000]}"
        for view in _decoded(text):
            for run in runs:
                assert run not in view, f"part of the key ({run!r}) leaked into:\n{text[:2000]}"


def assert_no_secret_in(key: str, folder: Path):
    """Every file under `folder`, whatever it is (results.json, report.md, plots, partial outputs)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        assert_no_secret(key, data, data.decode("latin-1"))
    return files
