"""The HTTP plumbing `serve` and `serve-web` share: a bounded pool of workers, timeouts, and clean errors.

Standard library only. socketserver's ThreadingMixIn starts one thread per connection, without limit and without
timeouts, so idle or half-sent connections pile up threads. Here instead:

- one poller thread (the one that calls serve_forever) accepts connections and watches every connection that is
  between requests or still sending a request head, without holding a thread for it;
- a connection goes to one of `workers` threads only once a whole request head has arrived; the worker reads the
  body, answers, and hands a keep-alive connection back to the poller;
- a request head must be complete within `request_timeout` of its first byte (else 408 and close), a body within
  `request_timeout` of its head, every write must finish within `request_timeout`, and a keep-alive connection
  with no request is closed after `idle_timeout`;
- at most `max_connections` are open: past that the connection idle the longest is closed to make room, and when
  none is idle the new one gets a 503.

Handlers subclass `Handler` (a BaseHTTPRequestHandler that owns request framing: Content-Length, chunked bodies,
unread bodies drained or the connection closed, so a keep-alive connection never desynchronises) and raise
`RequestError` for anything the client got wrong.
"""

from __future__ import annotations

import errno
import ipaddress
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from pocketvlm import interrupts
from pocketvlm.errors import PocketVLMError

MAX_HEAD = 64 << 10          # request line + headers; BaseHTTPRequestHandler alone would take 100 lines of 64 KB
DRAIN_LIMIT = 1 << 20        # an unread body up to this size is read and dropped, so the connection stays usable
LINGER_S = 2.0               # after an error with a body still arriving: how long to read and drop it before closing
LINGER_BYTES = 256 << 20     # (closing with unread data makes the kernel reset the connection, and the client
                             # may then never read the error it was sent)
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 32


class RequestError(PocketVLMError):
    """Something the client got wrong: answered with `status` and the message (JSON for `serve`)."""

    status = 400

    def __init__(self, message: str, status: int | None = None, *, close: bool = False,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.close = close
        self.headers = headers or {}


# ------------------------------------------------------------------------------------------------ addresses

@dataclass(frozen=True)
class BindAddress:
    host: str            # the literal bound: 127.0.0.1, ::1, 0.0.0.0, ...
    family: int
    loopback: bool
    wildcard: bool       # every interface (0.0.0.0 or ::)

    def url_host(self) -> str:
        return f"[{self.host}]" if self.family == socket.AF_INET6 else self.host


def parse_bind_host(host: str) -> BindAddress:
    """--host as an IP address (or localhost). Names are refused: resolving one could mean a DNS lookup, and what
    a name resolves to may change under a running server."""
    text = (host or "").strip()
    if text.lower() in ("localhost", "localhost."):
        text = "127.0.0.1"
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError as e:
        raise PocketVLMError(f"--host takes an IP address of this machine (127.0.0.1, ::1, 0.0.0.0 for every "
                             f"interface, or a LAN address), not {host!r}") from e
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return BindAddress(str(address), family, address.is_loopback, address.is_unspecified)


def parse_port(value) -> int:
    """--port, as a one-line error rather than argparse's usage dump or socket's OverflowError traceback."""
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise PocketVLMError(f"--port must be a number from 0 to 65535 (0 picks a free one), not {str(value)!r}")
    return int(text)


def listen_error(address: BindAddress, port: int, error: OSError) -> PocketVLMError:
    if error.errno == errno.EADDRINUSE:
        return PocketVLMError(f"port {port} on {address.host} is in use; pick another with --port "
                              f"(--port 0 picks a free one)")
    if error.errno == errno.EADDRNOTAVAIL:
        return PocketVLMError(f"{address.host} is not an address of this machine; pass --host with one of its "
                              f"addresses (127.0.0.1: this machine only)")
    if error.errno == errno.EACCES:
        return PocketVLMError(f"not allowed to listen on port {port} (ports below 1024 need privileges); "
                              f"pick another with --port")
    return PocketVLMError(f"cannot listen on {address.host}:{port} ({error.strerror or error})")


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback, read from the interfaces (Linux); no packets sent."""
    try:
        import fcntl
        import struct
    except ImportError:
        return []
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not address.startswith("127.") and address not in found:
                found.append(address)
    return found


# --------------------------------------------------------------------------------------------- socket I/O

class Reader:
    """Buffered reads from a connection, each bounded by `deadline` (time.monotonic()). BaseHTTPRequestHandler
    reads the head through readline(); bodies come through read(). The poller appends to `buf` directly."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received in time")
        self.sock.settimeout(left)

    def _fill(self) -> bool:
        self._arm()
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def readline(self, limit: int = -1) -> bytes:
        scanned = 0
        while True:
            end = self.buf.find(b"\n", scanned)
            if end >= 0 and (limit < 0 or end < limit):
                n = end + 1
                break
            if limit >= 0 and len(self.buf) >= limit:
                n = limit
                break
            scanned = len(self.buf)
            if not self._fill():
                n = len(self.buf)
                break
        line = bytes(self.buf[:n])
        del self.buf[:n]
        return line

    def read(self, n: int) -> bytearray:
        """Up to n bytes (fewer only if the client closed). The buffer grows with what arrives: a client that
        declares 64 MB and sends nothing costs nothing."""
        out = self.buf[:n]
        del self.buf[:n]
        while len(out) < n:
            self._arm()
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                break
            out += chunk
        return out

    def discard(self, n: int) -> int:
        """Read and drop up to n bytes; returns how many were dropped."""
        dropped = min(n, len(self.buf))
        del self.buf[:dropped]
        while dropped < n:
            self._arm()
            chunk = self.sock.recv(min(n - dropped, 1 << 16))
            if not chunk:
                break
            dropped += len(chunk)
        return dropped


class Writer:
    """Unbuffered writes, each bounded by the server's timeout (sendall's timeout covers the whole call)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout = sock, timeout

    def write(self, data) -> int:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ handler

class Handler(BaseHTTPRequestHandler):
    """One connection's requests, served one after another by whichever worker holds the connection.

    Subclasses implement do_GET / do_POST / ..., read a body with read_body(), answer with reply() or
    reply_error(), and raise RequestError for client mistakes. `error_body` decides what an error looks like."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so even an error about a garbled request line has a status line
    server_version = "pocketvlm"
    max_body = 64 << 20

    def __init__(self, conn: "Connection", server: "HTTPServer"):
        # BaseRequestHandler's __init__ would serve the connection to its end on this thread; here the server
        # calls handle_one_request() itself, on any worker, and keeps the connection between requests.
        self.conn = conn
        self.request = self.connection = conn.sock
        self.client_address = conn.address
        self.server = server
        self.rfile = conn.reader
        self.wfile = Writer(conn.sock, server.request_timeout)
        self.close_connection = False
        self._reset()

    def _reset(self) -> None:
        self.command, self.path, self.requestline = None, "", ""
        self.request_version = self.default_request_version
        self.headers = None
        self.body_left = 0           # bytes of a Content-Length body not read yet
        self.chunked = False         # a chunked body not read yet
        self.expect_continue = False
        self.headers_sent = False
        self.linger = False          # on closing: read and drop what the client still sends (see _linger)
        self._close_sent = False
        self._headers_buffer = []

    # ------------------------------------------------------------------------------------ what errors look like

    @classmethod
    def error_body(cls, status: int, message: str) -> tuple[str, bytes]:
        return "text/plain; charset=utf-8", (message + "\n").encode("utf-8", "replace")

    def extra_headers(self) -> dict[str, str]:
        """Headers every response of this request carries (CORS, for one)."""
        return {}

    def version_string(self) -> str:  # no Python version in the Server header
        return self.server_version

    def log_message(self, format, *args):  # quiet: one line per request is noise; bugs go to stderr (log_bug)
        pass

    def log_bug(self) -> None:
        print(f"pocketvlm: internal error answering {self.command} {self.path[:200]}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ one request

    def handle_one_request(self):
        self._reset()
        self.rfile.deadline = time.monotonic() + self.server.request_timeout
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "request line over 64 KB")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, f"method {self.command[:20]!r} is not supported")
                return
            self._framing()
            method()
        except RequestError as e:
            self._answer_error(e)
        except TimeoutError:
            self.close_connection = True
            if not self.headers_sent:
                self._safely(lambda: self.send_error(408, "the request was not received in time"))
        except OSError:  # the client went away (reset, broken pipe) or its socket failed
            self.close_connection = True
        except Exception:
            self.log_bug()
            self.close_connection = True
            if not self.headers_sent:
                self._safely(lambda: self.send_error(500, "internal error (a bug in pocketvlm; see its log)"))

    def _answer_error(self, e: RequestError) -> None:
        if self.headers_sent:  # mid-stream: nothing sane to add
            self.close_connection = True
            return
        self._safely(lambda: self.reply_error(e.status, str(e), close=e.close, headers=e.headers))

    def _safely(self, send) -> None:
        try:
            send()
        except OSError:
            self.close_connection = True

    def parse_request(self) -> bool:
        words = self.raw_requestline.split()
        if len(words) == 2:  # HTTP/0.9 has no status line or headers to answer with: nothing this server speaks
            self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.1")
            return False
        if not super().parse_request():
            return False
        if self.headers.defects:  # e.g. a line without a colon: Python's parser would drop the headers after it
            self.send_error(400, "malformed header line")
            return False
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1 or (not hosts and self.request_version == "HTTP/1.1"):
            self.send_error(400, "an HTTP/1.1 request needs exactly one Host header")
            return False
        return True

    def handle_expect_100(self) -> bool:
        # "100 Continue" only once a handler asks for the body (read_body), so a request refused on its head
        # (auth, route, Host) never makes the client send the body.
        self.expect_continue = True
        return True

    def _framing(self) -> None:
        """Where this request's body ends, from Content-Length or chunked transfer coding; refuse ambiguity (the
        classic request-smuggling mismatches) before any byte of the body is read."""
        te = self.headers.get_all("Transfer-Encoding") or []
        cl = self.headers.get_all("Content-Length") or []
        if te:
            if cl:
                raise RequestError("both Content-Length and Transfer-Encoding", close=True)
            codings = [c.strip().lower() for value in te for c in value.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise RequestError(f"unsupported Transfer-Encoding {', '.join(te)[:60]!r} (chunked only)", 501,
                                   close=True)
            self.chunked = True
            return
        values = {v.strip() for value in cl for v in value.split(",")}
        if not values:
            return
        if len(values) > 1:
            raise RequestError("conflicting Content-Length headers", close=True)
        value = values.pop()
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise RequestError(f"Content-Length must be a number of bytes, not {value[:30]!r}", close=True)
        length = int(value)
        if length > self.max_body:
            raise RequestError(f"request body of {length} bytes is over this server's limit of "
                               f"{self.max_body >> 20} MB", 413, close=True)
        self.body_left = length

    @property
    def has_body(self) -> bool:
        return self.chunked or self.body_left > 0 or self.headers.get("Content-Length") is not None

    def read_body(self) -> bytearray:
        """The whole request body (at most max_body bytes); 411 when the request does not say how long it is."""
        if not self.chunked and self.headers.get("Content-Length") is None:
            raise RequestError("the request has no body (Content-Length or chunked transfer encoding)", 411)
        if self.expect_continue:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.chunked:
            return self._read_chunked()
        body = self.rfile.read(self.body_left)
        short = len(body) < self.body_left
        self.body_left = 0
        if short:
            raise ConnectionError("the client closed the connection before sending the whole body")
        return body

    def _read_chunked(self) -> bytearray:
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                self.chunked = False
                if not line or len(line) <= MAX_CHUNK_LINE:
                    raise ConnectionError("the client closed the connection in the middle of a chunked body")
                raise RequestError("malformed chunked body (chunk-size line too long)", close=True)
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                    raise ValueError
                size = int(size_text, 16)
            except ValueError as e:
                self.chunked = False
                raise RequestError(f"malformed chunked body (chunk size {size_text[:20]!r})", close=True) from e
            if size == 0:
                break
            if len(body) + size > self.max_body:
                self.chunked = False
                raise RequestError(f"request body over this server's limit of {self.max_body >> 20} MB", 413,
                                   close=True)
            data = self.rfile.read(size)
            if len(data) < size:
                self.chunked = False
                raise ConnectionError("the client closed the connection in the middle of a chunked body")
            body += data
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.chunked = False
                raise RequestError("malformed chunked body (no CRLF after a chunk)", close=True)
        for _ in range(MAX_TRAILERS):  # trailer fields, ignored, up to the empty line
            if self.rfile.readline(MAX_CHUNK_LINE + 1) in (b"\r\n", b"\n", b""):
                self.chunked = False
                return body
        self.chunked = False
        raise RequestError("malformed chunked body (too many trailer lines)", close=True)

    # ------------------------------------------------------------------------------------------- responses

    def send_header(self, keyword, value):
        if keyword.lower() == "connection" and str(value).lower() == "close":
            if self._close_sent:
                return
            self._close_sent = True
        super().send_header(keyword, value)

    def end_headers(self):
        # A body the handler did not read would be taken for the next request on this connection: read it
        # away if it is small, else tell the client the connection closes (and drop what still arrives).
        if self.body_left or self.chunked or self.expect_continue:
            drained = False
            if self.body_left and not self.chunked and not self.expect_continue and self.body_left <= DRAIN_LIMIT:
                try:
                    drained = self.rfile.discard(self.body_left) == self.body_left
                except OSError:
                    drained = False
            if drained:
                self.body_left = 0
            else:
                self.send_header("Connection", "close")
                self.linger = True
        for key, value in self.extra_headers().items():
            self.send_header(key, value)
        self.headers_sent = True
        super().end_headers()

    def reply(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def reply_error(self, status: int, message: str, *, close: bool = False,
                    headers: dict[str, str] | None = None) -> None:
        content_type, data = self.error_body(status, message)
        headers = dict(headers or {})
        if close:
            headers["Connection"] = "close"
            self.linger = True
        self.reply(status, content_type, data, headers)

    def send_error(self, code, message=None, explain=None):
        """BaseHTTPRequestHandler's own errors (bad request line, headers too large, unknown method): the
        request's framing is unknown, so the connection closes."""
        if self.headers_sent:
            self.close_connection = True
            return
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        self.reply_error(code, message, close=True)


# ------------------------------------------------------------------------------------------------- server

class Connection:
    def __init__(self, sock: socket.socket, address, server: "HTTPServer"):
        self.sock, self.address = sock, address
        self.reader = Reader(sock)
        self.handler = server.handler_class(self, server)
        self.deadline = 0.0
        self.problem: tuple[int, str] | None = None  # the poller's verdict for a worker to answer (408, 431)
        self.line_end = -1                             # where the request line ends in reader.buf, once seen
        self.scanned = 0                               # how much of reader.buf was searched for the head's end

    def new_request(self) -> None:
        self.line_end, self.scanned = -1, 0

    def head_ready(self) -> bool:
        """Whether reader.buf holds a whole request head (or a first line no head can follow)."""
        buf = self.reader.buf
        stray = len(buf) - len(buf.lstrip(b"\r\n"))  # line ends between requests are ignored (RFC 9112 2.2)
        if stray:
            del buf[:stray]
            self.scanned = 0
        if self.line_end < 0:
            end = buf.find(b"\n", self.scanned)
            if end < 0:
                self.scanned = len(buf)
                return False
            self.line_end = self.scanned = end
            words = bytes(buf[:end]).split()
            if not words or not words[-1].startswith(b"HTTP/"):
                return True  # HTTP/0.9 or garbage: a worker answers 400 without waiting for headers
        start = max(self.line_end, self.scanned - 2)
        done = buf.find(b"\n\r\n", start) >= 0 or buf.find(b"\n\n", start) >= 0
        self.scanned = len(buf)
        return done


class HTTPServer:
    """serve_forever / shutdown / server_close / server_address, as socketserver's servers have them."""

    def __init__(self, address: BindAddress, port: int, handler_class: type[Handler], *, workers: int = 8,
                 max_connections: int = 128, request_timeout: float = 30.0, idle_timeout: float = 30.0):
        if workers < 1 or max_connections < workers:
            raise PocketVLMError(f"need at least one worker and no fewer connections than workers "
                                 f"(workers {workers}, connections {max_connections})")
        self.handler_class = handler_class
        self.workers, self.max_connections = workers, max_connections
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self.bind = address
        self.socket = socket.socket(address.family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((address.host, port))
            self.socket.listen(128)
        except OSError as e:
            self.socket.close()
            raise listen_error(address, port, e) from e
        self.server_address = self.socket.getsockname()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # connections with a whole head, for the workers
        self._returned: list[Connection] = []                 # keep-alive connections back from the workers
        self._lock = threading.Lock()
        self._open: set[Connection] = set()
        self._watched: dict[Connection, None] = {}             # the poller's connections, oldest first
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.refused = 0  # connections answered 503 at the door (the load test reports it)

    # -------------------------------------------------------------------------------------------- lifecycle

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        self._stopped.clear()
        if not self._threads:
            for i in range(self.workers):
                thread = threading.Thread(target=self._work, name=f"pocketvlm-http-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        selector = selectors.DefaultSelector()
        self.socket.setblocking(False)
        selector.register(self.socket, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(self._next_timeout(poll_interval)):
                    if key.data == "accept":
                        self._accept(selector)
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._readable(selector, key.data)
                self._take_back(selector)
                self._expire(selector)
        finally:
            selector.close()
            self._serving = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait for it to return."""
        self._stop.set()
        self._wake()
        if self._serving:
            self._stopped.wait()

    def server_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        self.socket.close()
        with self._lock:
            connections = list(self._open)
            self._open.clear()
        for conn in connections:
            _close_quietly(conn.sock)
        for _ in self._threads:
            self._ready.put(None)
        for sock in (self._wake_r, self._wake_w):
            _close_quietly(sock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    # ----------------------------------------------------------------------------------------------- poller

    def _next_timeout(self, poll_interval: float) -> float:
        if not self._watched:
            return poll_interval
        soonest = min(conn.deadline for conn in self._watched)
        return max(0.0, min(poll_interval, soonest - time.monotonic()))

    def _accept(self, selector) -> None:
        for _ in range(64):  # a burst at a time, then back to the others
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, a connection reset before accept: try again later
                return
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._lock:
                full = len(self._open) >= self.max_connections
            if full and not self._evict(selector):
                self.refused += 1
                self._refuse(sock)
                continue
            conn = Connection(sock, address, self)
            with self._lock:
                self._open.add(conn)
            self._watch(selector, conn)

    def _watch(self, selector, conn: Connection) -> None:
        conn.sock.setblocking(False)
        busy = bool(conn.reader.buf)  # a pipelined request already begun
        conn.deadline = time.monotonic() + (self.request_timeout if busy else self.idle_timeout)
        try:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (ValueError, OSError):  # closed meanwhile (server_close)
            self._close(conn)
            return
        self._watched[conn] = None

    def _unwatch(self, selector, conn: Connection) -> None:
        self._watched.pop(conn, None)
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _readable(self, selector, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed (a half-sent head has no one left to answer)
            self._unwatch(selector, conn)
            self._close(conn)
            return
        idle = not conn.reader.buf
        conn.reader.buf += chunk
        if conn.head_ready():
            self._dispatch(selector, conn)
        elif len(conn.reader.buf) > MAX_HEAD:
            conn.problem = (431 if conn.line_end >= 0 else 414, f"request head over {MAX_HEAD >> 10} KB")
            self._dispatch(selector, conn)
        elif idle and conn.reader.buf:
            # a request has begun: from now on it must arrive whole within the request timeout
            conn.deadline = time.monotonic() + self.request_timeout

    def _dispatch(self, selector, conn: Connection) -> None:
        self._unwatch(selector, conn)
        self._ready.put(conn)

    def _expire(self, selector) -> None:
        now = time.monotonic()
        for conn in [c for c in self._watched if c.deadline <= now]:
            if conn.reader.buf:  # a request head still incomplete: tell the client why it is cut off
                conn.problem = (408, "the request was not received in time")
                self._dispatch(selector, conn)
            else:
                self._unwatch(selector, conn)
                self._close(conn)

    def _evict(self, selector) -> bool:
        """Close the connection that has waited longest without a request (else the oldest half-sent one)."""
        victims = [c for c in self._watched if not c.reader.buf] or list(self._watched)
        if not victims:
            return False
        victim = victims[0]
        self._unwatch(selector, victim)
        self._close(victim)
        return True

    def _refuse(self, sock: socket.socket) -> None:
        content_type, body = self.handler_class.error_body(503, "server busy: too many open connections; "
                                                                      "retry shortly")
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)
            sock.send(head + body)  # a small reply fits the socket buffer; never block the poller on it
        except OSError:
            pass
        _close_quietly(sock)

    def _take_back(self, selector) -> None:
        with self._lock:
            returned, self._returned = self._returned, []
        for conn in returned:
            if self._stop.is_set():
                self._close(conn)
            elif conn.head_ready():
                self._ready.put(conn)
            else:
                self._watch(selector, conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # ---------------------------------------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            conn = self._ready.get()
            if conn is None:
                return
            try:
                keep = self._serve(conn)
            except Exception:  # a bug in the plumbing itself: this connection is lost, the server is not
                print(f"pocketvlm: internal error in the HTTP server:\n{traceback.format_exc()}", file=sys.stderr,
                      flush=True)
                keep = False
            if keep and not self._stop.is_set():
                with self._lock:
                    self._returned.append(conn)
                self._wake()
            else:
                self._close(conn, linger=conn.handler.linger)

    def _serve(self, conn: Connection) -> bool:
        """Answer the requests already buffered on conn; True to hand the connection back to the poller."""
        handler = conn.handler
        if conn.problem:
            status, message = conn.problem
            handler._reset()
            handler.linger = True
            handler._safely(lambda: handler.reply_error(status, message, close=True))
            return False
        while True:
            conn.new_request()
            handler.handle_one_request()
            if handler.close_connection:
                return False
            if not conn.reader.buf:
                return True
            conn.new_request()
            if not conn.head_ready():
                return True  # the start of the next request: the poller waits for the rest

    def _close(self, conn: Connection, linger: bool = False) -> None:
        with self._lock:
            self._open.discard(conn)
        if linger:
            _linger(conn.sock)
        _close_quietly(conn.sock)


def _linger(sock: socket.socket) -> None:
    """Tell the client we are done, then read and drop what it still sends for a moment, so the error it was
    sent is not lost to a connection reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + LINGER_S
        dropped = 0
        while dropped < LINGER_BYTES:
            left = end - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            dropped += len(chunk)
    except OSError:
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def serve_until_interrupted(server: HTTPServer) -> int:
    """Serve until Ctrl-C (a clean exit, status 0), closing the socket on any way out."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        interrupts.clear()  # handled: Ctrl-C is how serve ends
    finally:
        server.server_close()
    return 0
