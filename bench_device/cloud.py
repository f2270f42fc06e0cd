"""The cloud leg: one streamed chat completion against a hosted (or any OpenAI-compatible) vision API.

Standard library only (http.client), so the bench adds no HTTP dependency. `ask` is the one entry point (the bench's
cloud leg uses it; a router that escalates single questions can too).

The server is not trusted. Whatever it sends — a body that repeats the key in any encoding, an endless or dripping
stream, JSON of the wrong shape, a redirect, gzip nobody asked for — ends in a result or in one CloudError line,
never a traceback, and within the time and byte limits given. The key is checked before it goes into a header (a
header cannot carry a newline or a space, and http.client's own error would print the header), the base URL before
anything connects (providers.check_base_url: plain http only to this machine unless allowed), and no text that
came from the server leaves this module before Secret.scrub has looked for the key in it, decoded every way a
server might have encoded it. Of a server's error, only a short message from the known JSON error fields is shown;
CloudError.plain is the same line without it, for results files, which keep nothing the server wrote.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import email.utils
import html
import http.client
import json
import math
import os
import random
import re
import socket
import ssl
import threading
import time
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

from pocketvlm.errors import PocketVLMError

from .providers import (CloudPlan, ImageRule, PricePoint, Provider, builtin_path, check_base_url,  # noqa: F401
                        default_provider, describe_source, get_provider, load_catalog, load_providers, plan_cloud)

MAX_ERROR_BODY = 64 * 1024          # bytes of a non-200 body read to find its message
MAX_EVENT = 1024 * 1024             # one stream line
MAX_STREAM = 16 * 1024 * 1024       # a whole answer, stream or JSON
MESSAGE_CHARS = 200                 # of a server's error message, in our one line


class CloudError(PocketVLMError):
    """The cloud request failed in a way the user should see (bad key, quota, outage, cut stream, bad server).

    reason: a short machine-readable cause ("invalid_model", "not_found", "auth", "server", "timeout", ...) for
    callers that add advice of their own (the bench names --cloud-model, the router says the cloud timed out).
    plain: the message in our own words only, without anything the server sent (its error message, a header's
    value): what results files keep."""

    def __init__(self, message: str, reason: str = "error", plain: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.plain = message if plain is None else plain


def _said(before: str, said: str, after: str, reason: str) -> CloudError:
    """A CloudError whose line shows the server's words SAID (already scrubbed and short) between BEFORE and
    AFTER, and whose plain form leaves them out."""
    return CloudError(f"{before}{said}{after}", reason, plain=f"{before}{after}")


@dataclass
class CloudResult:
    text: str
    ttft_s: float
    total_s: float
    output_tok_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    model: str


# ------------------------------------------------------------------------------------------------ the key

_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: all an HTTP header value can carry safely


def check_key(raw: str | None, where: str = "the API key") -> str | None:
    """The key with surrounding whitespace removed (a trailing newline from `$(cat file)` or an editor is common),
    None when nothing is left; PocketVLMError when it still holds anything a header cannot carry. The message
    says what is wrong, never the key."""
    if raw is None:
        return None
    key = raw.strip()
    if not key:
        return None
    if not _KEY_CHARS.fullmatch(key):
        bad = next(c for c in key if not _KEY_CHARS.fullmatch(c))
        what = ("a space" if bad.isspace() and bad.isprintable() else
                "a control or line-break character" if unicodedata.category(bad)[0] == "C" or bad.isspace() else
                "a non-ASCII character")
        raise PocketVLMError(f"{where} is not usable: it contains {what} ({len(key)} characters; the key itself is "
                             f"not shown)")
    return key


def read_key(key_env: str) -> str | None:
    """The key from the environment variable `key_env`, checked (see check_key)."""
    return check_key(os.environ.get(key_env), f"${key_env}")


_URLSAFE = str.maketrans("+/", "-_")
_STANDARD = str.maketrans("-_", "+/")


def _base64_cores(data: bytes) -> set[str]:
    """What the base64 of any text holding DATA contains, whatever byte offset DATA starts at (3 cases): the
    groups made of DATA's own bytes only, in the standard and the URL-safe alphabet."""
    cores = set()
    for skip in range(3):  # skip 0: DATA starts a group; 1 and 2: the bytes before it end mid-group
        whole = data[skip:][:(len(data) - skip) // 3 * 3]
        if whole:
            core = base64.b64encode(whole).decode()
            cores |= {core, core.translate(_URLSAFE)}
    return cores


def _unhex(text: str, shift: int) -> str:
    """Runs of hex digits decoded (as Latin-1, a character a byte), starting SHIFT digits in."""
    def decode(m):
        run = m.group()[shift:]
        return bytes.fromhex(run[:len(run) // 2 * 2]).decode("latin-1")
    return re.sub(r"[0-9A-Fa-f]{8,}", decode, text)


def _unbase64(text: str, shift: int) -> str:
    """Runs of base64 (either alphabet) decoded (as Latin-1), starting SHIFT characters in: one of the 4 shifts
    lines up with wherever the encoded text began."""
    def decode(m):
        run = m.group().rstrip("=")[shift:].translate(_STANDARD)
        try:
            return base64.b64decode(run[:len(run) // 4 * 4]).decode("latin-1")
        except ValueError:
            return m.group()
    return re.sub(r"[A-Za-z0-9+/_-]{8,}=*", decode, text)


class Secret:
    """Finds the key in text from the server, whatever the encoding, so no output ever carries it."""

    def __init__(self, key: str | None):
        self.key = key or ""
        k = self.key
        forms = set()
        if k:
            escaped = json.dumps(k)[1:-1]
            forms |= {k, escaped, escaped.replace("/", "\\/"), quote(k, safe=""), quote_plus(k), html.escape(k),
                      "".join(f"\\u{ord(c):04x}" for c in k), "".join(f"\\u{ord(c):04X}" for c in k),
                      base64.b64encode(k.encode()).decode(), base64.urlsafe_b64encode(k.encode()).decode(),
                      base64.b64encode(f"Bearer {k}".encode()).decode(),
                      k[::-1], k.encode().hex(), k.encode().hex().upper(), codecs.encode(k, "rot13")}
            forms |= _base64_cores(k.encode()) | _base64_cores(f"Bearer {k}".encode())
        # a derived form too short to be told from ordinary text is left to leaks(), which withholds the whole text
        self.forms = sorted((f for f in forms if f == k or len(f) >= 8), key=len, reverse=True)
        # a fragment this long of a long key counts as a leak too (a server that echoes half the key)
        self.window = max(12, len(k) // 2) if len(k) >= 16 else len(k)

    @staticmethod
    def _views(text: str) -> list[str]:
        """The text decoded each way a server might have encoded the key, alone and one after the other."""
        def json_unescape(s):
            s = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), s)
            return s.replace("\\/", "/").replace('\\"', '"').replace("\\\\", "\\")

        def invisible(s):  # zero-width joiners, controls, spaces and line separators dropped
            return "".join(c for c in s if unicodedata.category(c) not in ("Cf", "Cc", "Zs", "Zl", "Zp"))

        decoders = (json_unescape, unquote, unquote_plus, html.unescape, lambda s: unicodedata.normalize("NFKC", s),
                    invisible)
        views, chained = [text], text
        for decode in decoders:
            views.append(decode(text))
            chained = decode(chained)
        # and the key written backwards, rot13'd, as hex or inside base64 at any offset, in the text and decoded
        for view in (text, chained):
            views += [view[::-1], codecs.encode(view, "rot13"), _unhex(view, 0), _unhex(view, 1),
                      *(_unbase64(view, shift) for shift in range(4))]
        return views + [chained]

    def leaks(self, text: str) -> bool:
        if not self.key or not text:
            return False
        k, n = self.key, self.window
        fragments = {k[i:i + n] for i in range(len(k) - n + 1)}
        for view in self._views(text):
            if k in view or any(f in view for f in fragments):
                return True
        return False

    def redact(self, text: str) -> str:
        """Every encoded form of the key replaced by ***."""
        for form in self.forms:
            text = text.replace(form, "***")
        return text

    def scrub(self, text: str, withheld: str = "(not shown: it contained the API key)") -> str:
        """`text` with the key's known forms redacted; all of it withheld if the key is still in there somehow."""
        text = self.redact(text)
        return withheld if self.leaks(text) else text


# ------------------------------------------------------------------------------------------------ the request

def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def build_payload(provider: Provider, question: str, images: list[bytes], max_tokens: int) -> dict:
    """A streamed chat request in the provider's dialect (Mistral: image_url is a string; OpenAI: an object)."""
    content = []
    for png in images:
        url = data_url(png)
        content.append({"type": "image_url", "image_url": url if provider.dialect == "mistral" else {"url": url}})
    content.append({"type": "text", "text": question})
    payload = {"model": provider.model, "messages": [{"role": "user", "content": content}],
               "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    if provider.dialect == "openai":
        payload["stream_options"] = {"include_usage": True}
    return payload


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when it is neither."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def ask(provider: Provider, key: str | None, question: str, images: list[bytes], max_tokens: int, *,
        timeout: float = 60.0, stall_timeout: float = 30.0, total_timeout: float = 600.0, retries: int = 4,
        max_wait: float = 60.0, max_bytes: int = MAX_STREAM, allow_plain_http: bool = False,
        sleep=time.sleep) -> CloudResult:
    """One streamed completion, timed: retries with backoff on 429/5xx/connection errors (honouring
    Retry-After up to max_wait), one-line CloudError on everything else.

    timeout: connect, and each wait for the response head; stall_timeout: longest silence inside a stream;
    total_timeout: the whole call, retries and waits included (a server that drips a byte at a time never
    stalls); past it, reason "timeout". max_bytes: the whole answer's size. `key` may be None (an endpoint without
    auth). allow_plain_http: http:// to a host other than this machine (see providers.check_base_url)."""
    try:
        key = check_key(key)
    except PocketVLMError as e:
        raise CloudError(str(e), "auth") from None
    secret = Secret(key)
    withheld = f"{provider.name}: the request failed (the message contained the API key and is not shown)"
    try:
        return _ask(provider, key, secret, question, images, max_tokens, timeout=timeout,
                    stall_timeout=stall_timeout, total_timeout=total_timeout, retries=retries, max_wait=max_wait,
                    max_bytes=max_bytes, allow_plain_http=allow_plain_http, sleep=sleep)
    except CloudError as e:
        raise CloudError(secret.scrub(str(e), withheld), e.reason, plain=secret.scrub(e.plain, withheld)) from None


def _ask(provider, key, secret, question, images, max_tokens, *, timeout, stall_timeout, total_timeout, retries,
         max_wait, max_bytes, allow_plain_http, sleep) -> CloudResult:
    try:  # before anything connects: the same check the flags and the providers file had
        check_base_url(provider.base_url, provider.url_from, allow_plain_http=allow_plain_http)
    except PocketVLMError as e:
        raise CloudError(str(e), "config") from None
    url = urlsplit(provider.base_url)
    port = url.port
    path = (url.path.rstrip("/") or "") + "/chat/completions"
    body = json.dumps(build_payload(provider, question, images, max_tokens)).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
               "Accept-Encoding": "identity"}  # we never decompress: nothing to bomb us with
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = ""
    # One deadline for the whole call. http.client has no limit of its own on a response head that never ends
    # (endless "100 Continue" lines, headers dripped a byte at a time): past the deadline a watchdog hangs up.
    deadline = time.monotonic() + total_timeout
    for attempt in range(1, retries + 2):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, port, timeout=min(timeout, remaining))
        wait, line = None, {"sock": None}
        hung_up = threading.Event()
        watchdog = threading.Timer(remaining, _hang_up, (line, hung_up))
        watchdog.daemon = True
        watchdog.start()
        try:
            start = time.perf_counter()
            conn.connect()
            line["sock"] = conn.sock  # kept: the response detaches it from conn when the server closes
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            if resp.status == 200:
                line["sock"].settimeout(stall_timeout)
                return _read_answer(resp, start, attempt, provider, secret, stall_timeout, deadline, max_bytes)
            if resp.status == 429 or resp.status >= 500:
                wait = _retry_after(resp.getheader("Retry-After"))
                last = f"HTTP {resp.status}"
            else:
                _refuse(resp, provider, secret)
        except CloudError:
            if hung_up.is_set():
                break
            raise
        except (socket.timeout, TimeoutError):
            last = f"no response within {timeout:g}s"
        except (ConnectionError, ssl.SSLError, http.client.HTTPException, OSError) as e:
            last = f"connection failed ({e.__class__.__name__})"
        finally:
            watchdog.cancel()
            conn.close()
        if hung_up.is_set():
            break
        if attempt <= retries:
            backoff = wait if wait is not None else 0.5 * 2 ** (attempt - 1) * (1 + random.random() / 4)
            sleep(max(0.0, min(backoff, max_wait, deadline - time.monotonic())))
    else:
        raise CloudError(f"{provider.name}: giving up after {retries + 1} attempts ({last})", "server")
    raise CloudError(f"{provider.name}: no complete answer within the total timeout ({total_timeout:g}s)"
                     + (f"; last: {last}" if last else ""), "timeout")


def _hang_up(line: dict, hung_up: threading.Event):
    """The watchdog: shut the socket so a read blocked inside http.client returns."""
    hung_up.set()
    sock = line["sock"]
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _refuse(resp, provider: Provider, secret: Secret):
    """A final (non-retried) answer other than 200, as one CloudError."""
    status = resp.status
    if status in (401, 403):
        raise CloudError(f"{provider.name} refused the API key (HTTP {status}); check ${provider.key_env}", "auth")
    if 300 <= status < 400:
        # never followed: a redirect could take the request, and its Authorization header, to another host
        raise CloudError(f"{provider.name} answered with a redirect (HTTP {status}), which is not followed; check "
                         f"the base URL", "redirect")
    try:
        raw = resp.read(MAX_ERROR_BODY)
    except (socket.timeout, TimeoutError, http.client.HTTPException, OSError):
        raw = b""
    kind, message = _error_body(raw, secret)
    shown = f": {message}" if message else ""
    if kind == "invalid_model" or message.lower().startswith("invalid model"):
        raise _said(f"{provider.name}: the API does not accept the model id {provider.model!r} (HTTP {status}", shown,
                    "); it may be retired", "invalid_model")
    if status == 404:
        raise _said(f"{provider.name}: HTTP 404 for model {provider.model!r}", shown, ": a retired model id (Mistral "
                    "answers those with 404) or a wrong base URL", "not_found")
    raise _said(f"{provider.name} rejected the request (HTTP {status}", shown, ")", "rejected")


def _error_body(raw: bytes, secret: Secret) -> tuple[str, str]:
    """(type, message) from an error body: only the message of a JSON error's known fields (message,
    error.message, detail, error), printable, scrubbed of the key (before it is cut short: a cut could leave a
    piece of the key no longer recognisable as one) and short; a body that is not a JSON error shows nothing of
    itself (an HTML page or a dump is no message)."""
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    inner = data.get("error") if isinstance(data.get("error"), dict) else {}
    kind = next((v for v in (data.get("type"), inner.get("type"), inner.get("code")) if isinstance(v, str)), "")
    message = next((v for v in (data.get("message"), inner.get("message"), data.get("detail"), data.get("error"))
                    if isinstance(v, str)), "")
    return kind, secret.scrub(_printable(message))[:MESSAGE_CHARS]


def _printable(text: str) -> str:
    """One line of visible characters: controls and format characters dropped, whitespace collapsed."""
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ the answer

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


def _whole(value, name: str, provider: Provider) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10 ** 9:
        raise CloudError(f"{provider.name} sent usage.{name} as {type(value).__name__}, not a whole number of "
                         f"tokens", "bad_answer")
    return value


def _usage(value, provider: Provider) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise CloudError(f"{provider.name} sent usage as {type(value).__name__}, not an object", "bad_answer")
    return (_whole(value.get("prompt_tokens"), "prompt_tokens", provider),
            _whole(value.get("completion_tokens"), "completion_tokens", provider))


def _pieces(chunk: dict, provider: Provider, field: str = "delta") -> tuple[list[str], bool]:
    """Text pieces and whether a choice finished, from one event (field "delta") or a whole answer ("message")."""
    choices = chunk.get("choices")
    if choices is None:
        return [], False
    if not isinstance(choices, list):
        raise CloudError(f"{provider.name} sent choices as {type(choices).__name__}, not a list", "bad_answer")
    pieces, finished = [], False
    for choice in choices:
        if not isinstance(choice, dict):
            raise CloudError(f"{provider.name} sent a choice that is not an object", "bad_answer")
        delta = choice.get(field)
        delta = {} if delta is None else delta
        if not isinstance(delta, dict):
            raise CloudError(f"{provider.name} sent a {field} that is not an object", "bad_answer")
        content = delta.get("content")
        if isinstance(content, list):  # some servers stream content parts
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if content is not None and not isinstance(content, str):
            raise CloudError(f"{provider.name} sent content as {type(content).__name__}, not text", "bad_answer")
        if content:
            pieces.append(content)
        if choice.get("finish_reason"):
            finished = True
    return pieces, finished


def _event(payload: str, provider: Provider, secret: Secret) -> dict:
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise CloudError(f"{provider.name} sent a malformed stream event (not JSON)", "bad_answer") from None
    if not isinstance(chunk, dict):
        raise CloudError(f"{provider.name} sent a malformed stream event (a JSON {type(chunk).__name__}, not an "
                         f"object)", "bad_answer")
    if chunk.get("object") == "error" or chunk.get("error"):  # an error reported inside the stream
        _, message = _error_body(payload.encode(), secret)
        raise _said(f"{provider.name} reported an error in the stream", f": {message}" if message else "", "",
                    "server")
    return chunk


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _lines(resp, deadline: float, max_bytes: int, provider: Provider):
    """The response body split into lines, read as it arrives: bounded in total size, line length and time."""
    buf, total = b"", 0
    while True:
        if time.monotonic() > deadline:
            raise CloudError(f"{provider.name}: the answer took longer than the total timeout", "timeout")
        data = resp.read1(65536)
        if not data:
            if buf:
                yield buf
            return
        total += len(data)
        if total > max_bytes:
            raise CloudError(f"{provider.name}: the answer went past {_size(max_bytes)}; stopped reading", "too_long")
        buf += data
        *complete, buf = buf.split(b"\n")
        yield from complete
        if len(buf) > MAX_EVENT:
            raise CloudError(f"{provider.name} sent a stream line longer than {_size(MAX_EVENT)}", "too_long")


def _read_answer(resp, start: float, attempt: int, provider: Provider, secret: Secret, stall: float,
                 deadline: float, max_bytes: int) -> CloudResult:
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise _said(f"{provider.name} sent a compressed answer", f" ({secret.scrub(_printable(encoding))[:20]})",
                    " though none was asked for", "bad_answer")
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype not in ("", "text/event-stream", "application/json"):
        raise _said(f"{provider.name} answered with a content type that is not an event stream",
                    f" ({secret.scrub(_printable(ctype))[:40]!r})", "", "bad_answer")
    text, first, usage, finished, model = [], None, (None, None), False, provider.model
    try:
        if ctype == "application/json":  # a server that ignored stream=true: one whole answer
            raw = b"".join(_lines_joined(resp, deadline, max_bytes, provider))
            chunk = _event(raw.decode("utf-8", errors="replace"), provider, secret)
            pieces, finished = _pieces(chunk, provider, "message")
            text += pieces
            first = time.perf_counter() if pieces else None
            usage = _usage(chunk.get("usage"), provider)
            model = chunk.get("model", model)
        else:
            for raw in _lines(resp, deadline, max_bytes, provider):
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    finished = True
                    break
                chunk = _event(payload, provider, secret)
                if isinstance(chunk.get("model"), str):
                    model = chunk["model"]
                if chunk.get("usage") is not None:
                    usage = _usage(chunk["usage"], provider)
                pieces, done = _pieces(chunk, provider)
                if pieces and first is None:
                    first = time.perf_counter()
                text += pieces
                finished = finished or done
    except (socket.timeout, TimeoutError):
        raise CloudError(f"{provider.name}: the stream stalled (no data for {stall:g}s)", "stalled") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise CloudError(f"{provider.name}: the stream was cut ({e.__class__.__name__})", "cut") from None
    end = time.perf_counter()
    if not finished:
        raise CloudError(f"{provider.name}: the stream ended before the answer was complete", "cut")
    answer = secret.redact("".join(text))
    if secret.leaks(answer):
        raise CloudError(f"{provider.name}: the answer contained the API key (encoded); not shown", "bad_answer")
    model = model if isinstance(model, str) and _MODEL_ID.fullmatch(model) and not secret.leaks(model) \
        else provider.model
    prompt_tokens, completion_tokens = usage
    ttft = (first or end) - start
    out_tps = completion_tokens / (end - first) if completion_tokens and first and end > first else None
    return CloudResult(text=answer, ttft_s=ttft, total_s=end - start, output_tok_s=out_tps,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, attempts=attempt,
                       model=model)


def _lines_joined(resp, deadline, max_bytes, provider):
    """The whole body (a JSON answer), through the same limits as a stream."""
    first = True
    for line in _lines(resp, deadline, max_bytes, provider):
        yield line if first else b"\n" + line
        first = False


# ------------------------------------------------------------------------------------------------ estimates

def estimate_image_tokens(provider: Provider, width: int, height: int) -> int:
    """The price estimate's image tokens for one image, by the provider's rule (see providers.ImageRule)."""
    return provider.image_rule().tokens(width, height)
