"""`pocketvlm serve`: an OpenAI-compatible chat endpoint over any backend, on loopback by default.

POST /v1/chat/completions (streamed or not), GET /v1/models and /v1/models/ID, enough for OpenAI/Mistral-style
clients (the bench's cloud client among them) to talk to an on-device model. Images come as data URLs, in either
dialect (`image_url` a string, as Mistral sends it, or an object, as OpenAI does); remote URLs are refused, since
the server is offline by design. Decoding is greedy; one request at a time runs the model (one model, one lock).

Two layers, kept apart so the router of issue 18 (answer on device, escalate to a cloud API when unsure) can wrap
the middle one:

    decode_body -> parse_request -> answer -> completion_body / chunk_body     plain functions, no HTTP
    ChatHandler (runtime/httpd.py underneath)                                  HTTP: access rules, framing, SSE

What it guarantees to a client, whatever it sends: a JSON error with the right status for anything malformed
(400 bad JSON or fields, 401 key, 403 Host/Origin, 404 route, 405 method, 408 too slow, 411 no length, 413 too
large a body or too many pixels, 414/431 head too large, 501 transfer coding, 503 too many connections), and a
connection that stays usable afterwards or is closed cleanly. Images are sized from their headers and held to a
per-request pixel budget before any decoding, and decoded under the same lock as inference; the question's length
in characters is held to what the model's context could ever take before anything is tokenized. With a fallback,
the lock covers the device step only: the cloud call (up to --fallback-timeout) waits outside it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

from pocketvlm import media
from pocketvlm.errors import PocketVLMError
from pocketvlm.jsonfile import dumps
from pocketvlm.paths import path_arg

from . import httpd
from .httpd import RequestError

if TYPE_CHECKING:
    from .base import Backend

MAX_BODY = 64 << 20
DEFAULT_MAX_TOKENS = 256
API_KEY_ENV = "POCKETVLM_API_KEY"
# What PIL can open is far more than what a chat client sends; the rest (EPS, PSD, ICNS, ...) is attack surface.
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP",
                 "TIFF": "TIFF"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               411: "invalid_request_error", 413: "request_too_large", 414: "request_too_large",
               431: "request_too_large", 500: "server_error", 501: "invalid_request_error", 503: "overloaded_error"}


class BadRequest(RequestError):
    """A request this server cannot answer as sent (HTTP 400)."""

    status = 400


class PayloadTooLarge(BadRequest):
    """Over a size limit: the body, or the images' pixels (HTTP 413)."""

    status = 413


# --------------------------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server and model."""

    pixel_budget: int = media.MIN_PIXEL_BUDGET
    max_images: int = 64
    context_length: int | None = None  # max_tokens is capped to it: decoding stops at the context anyway
    max_text_chars: int | None = None  # the question's characters; None: no limit

    @classmethod
    def for_backend(cls, backend: "Backend", pixel_budget: int | None = None) -> "Limits":
        cfg = backend.processor.config
        # the fewest tokens an image costs: its global tile (no splitting) between two markers
        per_image = cfg.image_seq_len + 3
        # A token stands for at most as many characters as its vocabulary entry is long (a byte-level entry holds
        # one character per byte, a character is at least a byte), so a question longer than the context times
        # the longest entry cannot fit whatever it says: refused by its length, before the tokenizer (seconds on
        # megabytes, under the model lock) ever sees it.
        vocab = backend.processor.tokenizer.get_vocab(with_added_tokens=True)
        longest = max(map(len, vocab), default=1)
        return cls(pixel_budget=pixel_budget or media.default_pixel_budget(cfg.longest_edge),
                   max_images=max(1, cfg.context_length // per_image), context_length=cfg.context_length,
                   max_text_chars=cfg.context_length * longest)


@dataclass
class ImagePart:
    label: str                 # "image 1", as errors name it
    data: bytes                # the file, base64-decoded, not yet decoded as an image
    header: media.ImageHeader


@dataclass
class ChatCall:
    """One parsed request: everything needed to answer it, images still undecoded."""

    question: str
    images: list[ImagePart] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS
    stream: bool = False


def decode_body(raw: bytes) -> object:
    """The request body as a JSON value, or BadRequest (not UTF-8, not JSON, NaN/Infinity, nested too deep)."""
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not UTF-8 (invalid byte at offset {e.start})") from e
    try:
        return json.loads(text.removeprefix("\ufeff"), parse_constant=_refuse_constant)
    except RecursionError as e:
        raise BadRequest("the request body's JSON is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise BadRequest(f"the request body is not valid JSON ({str(e)[:120]})") from e


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_request(body: object, limits: Limits = Limits()) -> ChatCall:
    """A chat-completions body -> ChatCall, or BadRequest / PayloadTooLarge. Only the last user turn is answered
    (no chat history yet). Images are base64-decoded and sized from their headers, never decoded here."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {_show(body)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    last_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object, not {_show(message)}")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{i}].role must be a string, not {_show(role)}")
        if role == "user":
            last_user = i
    if last_user is None:
        raise BadRequest("no message with role 'user'")
    content = messages[last_user].get("content")
    where = f"messages[{last_user}].content"
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise BadRequest(f"{where} must be a string or a list of parts, not {_show(content)}")
    texts, images, pixels, chars = [], [], 0, 0
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{here} must be an object, not {_show(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"{here}.text must be a string, not {_show(text)}")
            chars += len(text)
            if limits.max_text_chars is not None and chars > limits.max_text_chars:
                raise PayloadTooLarge(f"the question is over {limits.max_text_chars:,} characters, more than this "
                                      f"model's context ({limits.context_length} tokens) can hold; send a shorter "
                                      f"one")
            texts.append(text)
        elif kind == "image_url":
            if len(images) == limits.max_images:
                raise BadRequest(f"more than {limits.max_images} images: more than this model's context "
                                 f"({limits.context_length} tokens) can hold")
            image = _image_part(part.get("image_url"), here, f"image {len(images) + 1}")
            pixels += image.header.pixels
            images.append(image)
            if pixels > limits.pixel_budget:  # stop before base64-decoding the rest
                try:
                    media.check_pixel_budget([i.header for i in images], limits.pixel_budget,
                                             hint="send smaller images (or start the server with a larger "
                                                  "--pixel-budget)")
                except media.PixelBudgetError as e:
                    raise PayloadTooLarge(str(e)) from e
        else:
            raise BadRequest(f"{here}: unsupported content part type {_show(kind)} (text and image_url only)")
    question = " ".join(t for t in texts if t).strip()
    if not question:
        raise BadRequest("the question is empty: the last user message needs some text")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest("the text contains an unpaired surrogate (\\ud800-\\udfff), which is not Unicode text; "
                         "escape characters outside the BMP as surrogate pairs") from e
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(f"n must be 1 (one answer per request), not {_show(n)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, not {_show(stream)}")
    return ChatCall(question, images, _max_tokens(body), bool(stream))


def _max_tokens(body: dict) -> int:
    chosen = None
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"{key} must be a positive integer, not {_show(value)}")
        chosen = value if chosen is None else chosen
    return DEFAULT_MAX_TOKENS if chosen is None else chosen


def _image_part(ref, where: str, label: str) -> ImagePart:
    if isinstance(ref, dict):
        if "url" not in ref:
            raise BadRequest(f"{where}.image_url needs a 'url' (a data: URL)")
        url = ref["url"]
    else:
        url = ref
    if not isinstance(url, str):
        raise BadRequest(f"{where}: image_url must be a data: URL or an object with one in 'url', not {_show(url)}")
    if not url[:5].lower() == "data:":
        raise BadRequest(f"{label}: only data: URLs are accepted (this server never fetches from the network)")
    meta, comma, payload = url[5:].partition(",")
    if not comma:
        raise BadRequest(f"{label}: malformed data URL (no ',' before the data)")
    fields = [f.strip().lower() for f in meta.split(";")]
    mime = fields[0] or "text/plain"  # RFC 2397's default
    if not mime.startswith("image/"):
        raise BadRequest(f"{label}: the data URL's type is {_show(mime)}, not an image type (image/png, image/jpeg, "
                         f"...)")
    if "base64" not in fields[1:]:
        raise BadRequest(f"{label}: data URL must be base64-encoded (data:{mime};base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error) as e:
        raise BadRequest(f"{label}: invalid base64 in data URL") from e
    try:
        header = media.read_image_header(data, label)
    except media.PixelBudgetError as e:
        raise PayloadTooLarge(str(e)) from e
    except PocketVLMError as e:
        raise BadRequest(str(e)) from e
    if header.format not in IMAGE_FORMATS:
        raise BadRequest(f"{label}: a {header.format} image; send PNG, JPEG, WebP, GIF, BMP or TIFF")
    return ImagePart(label, data, header)


def _show(value) -> str:
    """A short, safe description of a client's value for an error message (never the whole of it)."""
    if isinstance(value, str):
        text = repr(value[:40]) + ("..." if len(value) > 40 else "")
        return text
    if value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge number"
        return text[:40]
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------- answering

@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of answer) or "length" (max_tokens or the context window)
    routing: dict | None = None  # with a fallback: route, confidence, reason, cost (router.Routed.to_json)


def decode_images(call: ChatCall) -> list:
    images = []
    for part in call.images:
        try:
            images.append(media.open_image_bytes(part.data, part.label))
        except PocketVLMError:
            raise
        except Exception as e:  # PIL's decoders on crafted data: a bad image, not a server bug
            raise media.MediaError(f"{part.label}: corrupt image ({e.__class__.__name__})") from e
    return images


def answer(backend: "Backend", call: ChatCall, on_text: Callable[[str], None] | None = None,
           fallback=None, log: Callable[[str], None] | None = None, lock=None) -> Answer:
    """Decode the images and run the backend, holding LOCK (the server's one model lock: decoding and inference
    cost memory and compute). on_text gets the answer as it streams, leading space removed. User errors (a prompt
    longer than the context, an image PIL cannot decode) raise PocketVLMError before on_text is first called.

    With a fallback (pocketvlm.router), the device answers first and an unsure answer is sent to the cloud; the
    answer is known only then, so on_text gets it whole, once. Only the device step holds LOCK: a cloud that is
    slow or silent (up to --fallback-timeout) must not hold up every other client."""
    from pocketvlm.prompt import Request
    from pocketvlm.router import Escalation, escalate, log_line, on_device

    lock = lock if lock is not None else contextlib.nullcontext()
    cfg = backend.processor.config
    max_tokens = min(call.max_tokens, cfg.context_length)
    started = False

    def on_step(step):
        nonlocal started
        piece = step.text
        if not started:  # the model's answer starts after "Assistant:" with a space
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            on_text(piece)

    if fallback is None:
        with lock:
            request = Request(call.question, images=decode_images(call))
            result = backend.run(request, max_tokens, on_step=on_step if on_text else None)
        ended = bool(result.token_ids) and result.token_ids[-1] in backend.processor.eos_token_ids
        return Answer(result.answer, result.prompt_tokens, len(result.token_ids), "stop" if ended else "length")
    with lock:  # the device step: decoding, inference, and the PNGs the cloud would be sent
        step = on_device(backend, Request(call.question, images=decode_images(call)), max_tokens, fallback)
    routed = escalate(step, fallback, max_tokens) if isinstance(step, Escalation) else step
    if log:
        log(log_line(routed, len(call.images)))
    result = routed.device
    ended = bool(result.token_ids) and result.token_ids[-1] in backend.processor.eos_token_ids
    finish = "stop" if ended or routed.route == "cloud" else "length"
    if on_text and routed.answer:
        on_text(routed.answer)
    return Answer(routed.answer, result.prompt_tokens, len(result.token_ids), finish, routed.to_json())


def _usage(a: Answer) -> dict:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def completion_body(model_id: str, a: Answer) -> dict:
    body = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                         "finish_reason": a.finish_reason}],
            "usage": _usage(a)}
    if a.routing is not None:  # an extension field: where the answer came from (clients ignore unknown fields)
        body["pocketvlm"] = a.routing
    return body


def chunk_body(cid: str, created: int, model_id: str, delta: dict, finish: str | None = None,
               usage: dict | None = None) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        chunk["usage"] = usage
    return chunk


class ChatService:
    """The model behind the endpoint: parse -> answer, one answer at a time."""

    def __init__(self, backend: "Backend", model_id: str | None = None, *, pixel_budget: int | None = None,
                 fallback=None, log: Callable[[str], None] | None = None):
        self.backend = backend
        self.fallback = fallback  # pocketvlm.router.Fallback: unsure answers go to the cloud
        self.log = log
        self.model_id = model_id or backend.name
        self.limits = Limits.for_backend(backend, pixel_budget)
        # One lock bounds both image decoding and inference: a queue of big images costs memory one at a time.
        self.lock = threading.Lock()

    def parse(self, body: object) -> ChatCall:
        return parse_request(body, self.limits)

    def answer(self, call: ChatCall, on_text: Callable[[str], None] | None = None) -> Answer:
        return answer(self.backend, call, on_text, self.fallback, self.log, lock=self.lock)

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "owned_by": "pocketvlm"}


# ------------------------------------------------------------------------------------------ access rules

class Access:
    """Who may talk to the server: the Host a request names (DNS rebinding), the page it comes from (CSRF), the
    API key."""

    def __init__(self, bind: httpd.BindAddress, *, api_key: str | None = None, allow_hosts=(), allow_origins=()):
        self.key = api_key.encode() if api_key else None
        hosts = {"localhost", "127.0.0.1", "[::1]", bind.url_host().lower()}
        if bind.wildcard:
            hosts |= set(httpd.lan_addresses())
        self.any_host = False
        for value in allow_hosts:
            if value.strip() == "*":
                self.any_host = True
                continue
            host = _host_of(value)
            if host is None:
                raise PocketVLMError(f"--allow-host {value!r}: not a host name or address")
            hosts.add(host)
        self.hosts = frozenset(hosts)
        self.any_origin = False
        origins = set()
        for value in allow_origins:
            if value.strip() == "*":
                self.any_origin = True
                continue
            origin = _origin_of(value)
            if origin is None:
                raise PocketVLMError(f"--allow-origin {value!r}: not an origin (scheme://host[:port], e.g. "
                                     f"http://localhost:5173)")
            origins.add(origin)
        self.origins = frozenset(origins)

    def host_allowed(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host (1.1 requires one): not a browser, so not a rebinding
            return True
        host = _host_of(header)
        return host is not None and (self.any_host or host in self.hosts)

    def same_origin(self, origin: str, host_header: str | None) -> bool:
        parsed = _origin_parts(origin)
        if parsed is None or host_header is None:
            return False
        scheme, host, port = parsed
        own = _origin_parts(f"{scheme}://{host_header.strip()}")
        return own is not None and own == parsed

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        if self.any_origin or self.same_origin(origin, host_header):
            return True
        normal = _origin_of(origin)
        return normal is not None and normal in self.origins

    def authorized(self, header: str | None) -> bool:
        if self.key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # constant time: how much of a guess matched must not show in the response time
        return hmac.compare_digest(token.strip().encode("latin-1", "replace"), self.key)


def _host_of(value: str) -> str | None:
    """A Host header (or --allow-host) as a bare lowercase host: 'Example.com:8000' -> 'example.com',
    '[::1]:8000' -> '[::1]'; None when malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[:end + 1], text[end + 1:]
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    host = host.rstrip(".") if not host.startswith("[") else host
    if not host or any(c in host for c in "/\\@ ,?#\t"):
        return None
    return host


def _origin_parts(value: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _origin_of(value: str) -> str | None:
    if value.strip() == "null":  # sandboxed frames and file:// pages send this
        return "null"
    parts = _origin_parts(value)
    if parts is None:
        return None
    scheme, host, port = parts
    host = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


# --------------------------------------------------------------------------------------------------- HTTP

ROUTES = {"/v1/models": ("GET",), "/v1/chat/completions": ("POST",)}


def make_handler(service: ChatService, access: Access) -> type[httpd.Handler]:
    class ChatHandler(httpd.Handler):
        max_body = MAX_BODY

        def _reset(self):
            super()._reset()
            self.cors = {}  # CORS headers for this request's responses, errors included (set by _admit)

        @classmethod
        def error_body(cls, status, message):
            status = int(status)
            body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                              "code": status}}
            return "application/json", dumps(body, indent=None).encode()

        def extra_headers(self):
            return self.cors

        def reply_json(self, status: int, obj: dict) -> None:
            self.reply(status, "application/json", dumps(obj, indent=None).encode())

        # every method goes through the same door: Host and Origin first, then (but for a preflight) the key
        def _dispatch(self):
            self._admit()
            if self.command == "OPTIONS":
                return self._preflight()
            if not access.authorized(self.headers.get("Authorization")):
                raise RequestError("invalid or missing API key (send Authorization: Bearer KEY)", 401,
                                   headers={"WWW-Authenticate": 'Bearer realm="pocketvlm"'})
            route = self._route()
            if route.startswith("/v1/models/"):
                if self.command != "GET":
                    raise RequestError(f"{self.command} is not allowed on {route}", 405,
                                       headers={"Allow": "GET, OPTIONS"})
                if route[len("/v1/models/"):] != service.model_id:
                    raise RequestError(f"no model {route[len('/v1/models/'):][:80]!r} here "
                                       f"(this server has {service.model_id!r})", 404)
                return self.reply_json(200, service.model_card())
            if self.command not in ROUTES[route]:
                raise RequestError(f"{self.command} is not allowed on {route}", 405,
                                   headers={"Allow": ", ".join(ROUTES[route] + ("OPTIONS",))})
            if route == "/v1/models":
                return self.reply_json(200, {"object": "list", "data": [service.model_card()]})
            return self._chat()

        do_GET = do_POST = do_OPTIONS = do_HEAD = do_PUT = do_DELETE = do_PATCH = _dispatch

        def _admit(self):
            host = self.headers.get("Host")
            if not access.host_allowed(host):
                raise RequestError(f"this server does not answer to Host {host[:80]!r} (a DNS-rebinding guard); "
                                   f"start it with --allow-host to accept that name", 403)
            origin = self.headers.get("Origin")
            if origin is not None:
                if not access.origin_allowed(origin, host):
                    raise RequestError(f"requests from web pages at {origin[:80]!r} are refused (a guard against "
                                       f"cross-site requests); start the server with --allow-origin to allow "
                                       f"that origin", 403)
                if not access.same_origin(origin, host):
                    self.cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            elif (self.headers.get("Sec-Fetch-Site") or "").lower() in ("cross-site", "same-site") \
                    and not access.any_origin:
                raise RequestError("cross-site requests are refused (start the server with --allow-origin to "
                                   "allow a page's origin)", 403)

        def _preflight(self):
            self.send_response(204)
            self.send_header("Allow", "GET, POST, OPTIONS")
            if self.cors:
                self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
                self.send_header("Access-Control-Max-Age", "600")
            self.end_headers()

        def _route(self) -> str:
            if not self.path.startswith("/"):
                raise RequestError("the request target must be a path (/v1/...)")
            route = urlsplit(self.path).path.rstrip("/") or "/"
            if route in ROUTES or (route.startswith("/v1/models/") and len(route) > len("/v1/models/")):
                return route
            raise RequestError(f"no route {route[:200]!r} (this server has POST /v1/chat/completions and "
                               f"GET /v1/models)", 404)

        def _chat(self):
            call = service.parse(decode_body(self.read_body()))
            if call.stream:
                return self._stream(call)
            try:
                result = service.answer(call)
            except RequestError:
                raise
            except PocketVLMError as e:
                raise BadRequest(str(e)) from e
            self.reply_json(200, completion_body(service.model_id, result))

        def _stream(self, call: ChatCall):
            cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), service.model_id
            started = False

            def event(obj: dict) -> None:
                self.wfile.write(f"data: {dumps(obj, indent=None)}\n\n".encode())

            def send(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
                nonlocal started
                if not started:  # the status goes out with the first token, so an error before it is a 400
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")  # the stream ends with the connection
                    self.end_headers()
                    started = True
                    event(chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
                event(chunk_body(cid, created, model, delta, finish, usage))

            try:
                result = service.answer(call, on_text=lambda piece: send({"content": piece}))
            except RequestError:
                raise
            except PocketVLMError as e:
                if not started:
                    raise BadRequest(str(e)) from e
                event({"error": {"message": str(e), "type": "invalid_request_error"}})
                self.close_connection = True
                return
            last = chunk_body(cid, created, model, {}, result.finish_reason, _usage(result))
            if result.routing is not None:
                last["pocketvlm"] = result.routing
            if not started:  # an empty answer: the status and the role still go out first
                send({"content": ""})
            event(last)
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    ChatHandler.service = service  # for whoever holds the server (tests): server.handler_class.service
    return ChatHandler


def check_exposure(bind: httpd.BindAddress, api_key: str | None, insecure: bool) -> None:
    if not bind.loopback and not api_key and not insecure:
        raise PocketVLMError(f"--host {bind.host} makes the model reachable from other machines; require a key "
                             f"(set {API_KEY_ENV}, or --api-key), or pass --insecure to serve it without one")


def check_api_key(key: str) -> str:
    if not key or not all(33 <= ord(c) <= 126 for c in key):
        raise PocketVLMError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def make_server(backend: "Backend", host: str = "127.0.0.1", port: int = 8000, *, model_id: str | None = None,
                api_key: str | None = None, insecure: bool = False, allow_hosts=(), allow_origins=(),
                pixel_budget: int | None = None, workers: int = 8, max_connections: int = 128,
                timeout: float = 30.0, fallback=None, log: Callable[[str], None] | None = None) -> httpd.HTTPServer:
    """The endpoint over BACKEND, bound and ready for serve_forever(). Refuses a non-loopback address without an
    API key unless insecure."""
    bind = httpd.parse_bind_host(host)
    if api_key is not None:
        check_api_key(api_key)
    check_exposure(bind, api_key, insecure)
    access = Access(bind, api_key=api_key, allow_hosts=allow_hosts, allow_origins=allow_origins)
    service = ChatService(backend, model_id, pixel_budget=pixel_budget, fallback=fallback, log=log)
    return httpd.HTTPServer(bind, httpd.parse_port(port), make_handler(service, access), workers=workers,
                            max_connections=max_connections, request_timeout=timeout, idle_timeout=timeout)


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    """serve's options (the CLI adds --threads, which every engine command shares)."""
    parser.add_argument("model", type=path_arg, help="model folder, Hub id in the cache, or exported artifact")
    parser.add_argument("--host", default="127.0.0.1",
                        help="IP address to bind (default 127.0.0.1: this machine only; ::1 for IPv6; any other "
                             "address needs an API key, or --insecure)")
    parser.add_argument("--port", default="8000", help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-id", help="model name reported to clients (default: the backend name)")
    parser.add_argument("--adapter", type=path_arg,
                        metavar="DIR", help="apply this LoRA adapter artifact to MODEL (gguf or mlx)")
    parser.add_argument("--api-key",
                        help=f"require this bearer token from clients. A command line is visible to every user of "
                             f"the machine (ps): prefer the {API_KEY_ENV} environment variable, read when "
                             f"--api-key is not given")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a --host other than loopback without an API key (anyone who reaches the "
                             "port can use the model)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                        help="also answer requests whose Host header is HOST (e.g. a reverse proxy's name; '*' "
                             "for any). By default only the bound address, localhost, 127.0.0.1 and [::1] (and "
                             "this machine's addresses with 0.0.0.0): a guard against DNS rebinding. Repeatable")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. http://localhost:5173; '*' for any) call the API "
                             "from a browser; requests from other pages are refused, so a site you visit cannot "
                             "use the model behind your back. Repeatable")
    parser.add_argument("--pixel-budget", metavar="MP",
                        help=f"most megapixels one request's images may add up to, read from their headers before "
                             f"any decoding; over it is a 413 (default: {media.IMAGES_WORTH} images at the "
                             f"model's longest edge, at least {media.MIN_PIXEL_BUDGET // 1_000_000})")
    parser.add_argument("--workers", default="8", metavar="N",
                        help="requests handled at once (the model still answers one at a time); idle "
                             "connections hold no worker (default 8)")
    parser.add_argument("--timeout", default="30", metavar="S",
                        help="seconds a client has to send a request and to take each part of the answer; idle "
                             "keep-alive connections close after as long (default 30)")


def _number(value, flag: str, kind=float, low=None, high=None):
    try:
        number = kind(str(value).strip())
    except ValueError:
        number = None
    if number is None or number != number or (low is not None and number < low) or \
            (high is not None and number > high):
        bounds = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
        raise PocketVLMError(f"{flag} must be a number {bounds}, not {str(value)!r}")
    return number


def main(args) -> int:
    """`pocketvlm serve`: check every option, load the model, serve until Ctrl-C."""
    from pocketvlm.runtime import open_backend

    bind = httpd.parse_bind_host(args.host)
    port = httpd.parse_port(args.port)
    key_from = "--api-key" if args.api_key is not None else API_KEY_ENV
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if api_key is not None:
        check_api_key(api_key)
    check_exposure(bind, api_key, args.insecure)
    budget = args.pixel_budget and int(_number(args.pixel_budget, "--pixel-budget", low=0.01, high=10_000) * 1e6)
    workers = int(_number(args.workers, "--workers", int, 1, 256))
    timeout = _number(args.timeout, "--timeout", float, 0.1, 3600)
    Access(bind, allow_hosts=args.allow_host, allow_origins=args.allow_origin)  # their errors before the load
    from pocketvlm.router import Fallback

    fallback = Fallback.configure(getattr(args, "fallback", None), model=getattr(args, "fallback_model", None),
                                  base_url=getattr(args, "fallback_base_url", None),
                                  providers_file=getattr(args, "providers", None),
                                  min_confidence=getattr(args, "min_confidence", None),
                                  no_cloud=getattr(args, "no_cloud", False),
                                  timeout=getattr(args, "fallback_timeout", None),
                                  allow_plain_http=getattr(args, "allow_plain_http", False))

    backend = open_backend(args.model, threads=getattr(args, "threads", None), torch_free=True,
                           image_size=getattr(args, "image_size", None), adapter=getattr(args, "adapter", None))
    server = make_server(backend, bind.host, port, model_id=args.model_id, api_key=api_key,
                         insecure=args.insecure, allow_hosts=args.allow_host, allow_origins=args.allow_origin,
                         pixel_budget=budget or None, workers=workers, max_connections=max(128, 4 * workers),
                         timeout=timeout, fallback=fallback,
                         log=lambda line: print(f"pocketvlm: {line}", file=sys.stderr, flush=True))
    port = server.server_address[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(bind.host, bind.url_host())

    def say(line: str) -> None:
        print(f"pocketvlm: {line}", file=sys.stderr, flush=True)

    say(f"serving {args.model} ({backend.name} {backend.quant}) on http://{shown}:{port}/v1 "
        f"(OpenAI-compatible chat completions; Ctrl-C stops)")
    if bind.wildcard:
        for address in httpd.lan_addresses():
            say(f"reachable from other machines at http://{address}:{port}/v1")
    if api_key:
        say(f"clients must send Authorization: Bearer <the key from {key_from}>")
        if key_from == "--api-key":
            say(f"note: other users of this machine can read --api-key in the process list; set {API_KEY_ENV} "
                f"instead")
    elif not bind.loopback:
        say(f"warning: no API key (--insecure): anyone who can reach port {port} can use the model")
    if fallback:
        say(f"answers below confidence {fallback.min_confidence:g} go to {fallback.provider.model} at "
            f"{fallback.provider.base_url} (each such request is logged here)")
    return httpd.serve_until_interrupted(server)
