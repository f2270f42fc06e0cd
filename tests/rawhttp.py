"""HTTP spoken by hand over one TCP connection, for the adversarial tests of `serve` and `serve-web`: malformed
requests need a raw socket (no client library sends them), and reading responses one by one shows whether a
keep-alive connection stays in step."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lowercase names
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def error_message(self) -> str:
        """The JSON error a `serve` error response must carry."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        message = self.json()["error"]["message"]
        assert isinstance(message, str) and message
        return message


def request(method: str, path: str, *, host: str | None = "127.0.0.1", headers: dict | None = None,
            body: bytes = b"", version: str = "HTTP/1.1", length: bool = True) -> bytes:
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Raw:
    """One connection. send() bytes, then response() reads exactly one response (None at end of stream)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> "Raw":
        self.sock.sendall(data)
        return self

    def response(self, head: bool = False) -> Response | None:
        line = self.file.readline(65537)
        if not line:
            return None
        version, status, *reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version.startswith("HTTP/1."), line
        headers = {}
        while True:
            raw = self.file.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            key, _, value = raw.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        code = int(status)
        if head or code < 200 or code in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = self.file.read(int(headers["content-length"]))
        else:  # close-delimited (an event stream)
            body = self.file.read()
        return Response(code, reason[0] if reason else "", headers, body)

    def at_eof(self) -> bool:
        """True once the server has closed the connection (everything it sent read first)."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
