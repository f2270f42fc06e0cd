"""`pocketvlm serve`: an OpenAI-compatible chat endpoint over any backend, on loopback by default.

POST /v1/chat/completions (streamed or not) and GET /v1/models, enough for OpenAI/Mistral-style clients (the
bench's cloud client among them) to talk to an on-device model. Images come as data URLs, in either dialect
(`image_url` a string, as Mistral sends it, or an object, as OpenAI does); remote URLs are refused, since the
server is offline by design. Decoding is greedy; requests are served one at a time (one model, one lock).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pocketvlm.errors import PocketVLMError
from pocketvlm.media import open_image_bytes
from pocketvlm.prompt import Request

from .base import Backend

MAX_BODY = 64 << 20
DEFAULT_MAX_TOKENS = 256


class BadRequest(PocketVLMError):
    pass


def parse_request(body: dict) -> tuple[Request, int]:
    """Chat messages -> (Request, max_tokens). Only the last user turn is answered (no chat history yet)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("message content must be a string or a list of parts")
    texts, images = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(_image_from_url(url, f"image {i + 1}"))
        else:
            raise BadRequest(f"unsupported content part {kind!r} (text and image_url only)")
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return Request(" ".join(t for t in texts if t).strip(), images=images), max_tokens


def _image_from_url(url, label: str):
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest(f"{label}: only data: URLs are accepted (this server never fetches from the network)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest(f"{label}: data URL must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise BadRequest(f"{label}: invalid base64 in data URL") from None
    return open_image_bytes(data, label)


def make_handler(backend: Backend, model_id: str, api_key: str | None):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; the CLI prints one line per request instead
            pass

        def _json(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
            self._json(status, {"error": {"message": message, "type": kind}})

        def _authorized(self) -> bool:
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._error(401, "invalid API key", "authentication_error")
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model_id, "object": "model",
                                                             "owned_by": "pocketvlm"}]})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}", "not_found")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(413, f"request body over {MAX_BODY >> 20} MB")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                request, max_tokens = parse_request(body)
            except (ValueError, PocketVLMError) as e:
                return self._error(400, str(e) if isinstance(e, PocketVLMError) else "request body is not JSON")
            with lock:
                try:
                    prompt_tokens = len(backend.prompt_token_ids(request))
                except PocketVLMError as e:
                    return self._error(400, str(e))
                if body.get("stream"):
                    self._stream(request, max_tokens, prompt_tokens)
                else:
                    result = backend.run(request, max_tokens)
                    self._json(200, _completion(model_id, result.answer, prompt_tokens, len(result.token_ids)))

        def _stream(self, request, max_tokens, prompt_tokens):
            cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def send(delta: dict, finish=None, usage=None):
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                if usage:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            send({"role": "assistant", "content": ""})
            n, eos, text_started = 0, backend.processor.eos_token_ids, False
            last = None
            for step in backend.generate(request, max_tokens):
                n += 1
                last = step.token_id
                piece = step.text
                if not text_started:  # the model's answer starts after "Assistant:" with a space
                    piece = piece.lstrip()
                    text_started = bool(piece)
                if piece:
                    send({"content": piece})
            finish = "stop" if last in eos else "length"
            send({}, finish, {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                              "total_tokens": prompt_tokens + n})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def _completion(model_id: str, text: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 8000, *, model_id: str | None = None,
                api_key: str | None = None) -> ThreadingHTTPServer:
    try:
        server = ThreadingHTTPServer((host, port), make_handler(backend, model_id or backend.name, api_key))
    except OSError as e:
        raise PocketVLMError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    server.daemon_threads = True
    return server
