"""The cloud leg: one streamed chat completion against a hosted (or any OpenAI-compatible) vision API.

Standard library only (http.client), so the bench adds no HTTP dependency. The API key is read from the
provider's environment variable and never appears in a message, a report or an exception: every text that could
carry it passes through _redact.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import math
import random
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from pocketvlm.errors import PocketVLMError


class CloudError(PocketVLMError):
    """The cloud request failed in a way the user should see (bad key, quota, outage, cut stream)."""


@dataclass(frozen=True)
class Provider:
    id: str
    name: str
    base_url: str
    dialect: str          # "mistral" | "openai"
    model: str
    key_env: str
    input_per_m: float    # USD per million input tokens
    output_per_m: float   # USD per million output tokens
    context: int | None
    price_date: str | None
    price_source: str
    image_tokens: dict

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return prompt_tokens * self.input_per_m / 1e6 + completion_tokens * self.output_per_m / 1e6


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


@lru_cache(maxsize=None)
def _builtin() -> str:
    return resources.files("pocketvlm").joinpath("data/providers.json").read_text()


def load_providers(path: Path | None = None) -> dict[str, Provider]:
    text = Path(path).read_text() if path else _builtin()
    data = json.loads(text)
    return {k: Provider(id=k, **v) for k, v in data.items() if not k.startswith("_")}


def get_provider(name: str, *, path: Path | None = None, model: str | None = None,
                 base_url: str | None = None) -> Provider:
    providers = load_providers(path)
    if name not in providers:
        raise PocketVLMError(f"unknown cloud provider {name!r}; choose one of: {', '.join(providers)}")
    p = providers[name]
    changes = {k: v for k, v in (("model", model), ("base_url", base_url)) if v}
    return Provider(**{**asdict(p), **changes}) if changes else p


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


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
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def ask(provider: Provider, key: str, question: str, images: list[bytes], max_tokens: int, *,
        timeout: float = 60.0, stall_timeout: float = 30.0, retries: int = 4, max_wait: float = 60.0,
        sleep=time.sleep) -> CloudResult:
    """One streamed completion, timed: retries with backoff on 429/5xx/connection errors (honouring
    Retry-After), one-line CloudError on everything else."""
    url = urlsplit(provider.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise CloudError(f"bad base URL for {provider.id}: {provider.base_url!r}")
    path = url.path.rstrip("/") + "/chat/completions"
    body = json.dumps(build_payload(provider, question, images, max_tokens)).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
               "Accept": "text/event-stream"}
    last = ""
    for attempt in range(1, retries + 2):
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, url.port, timeout=timeout)
        wait = None
        try:
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            sock = conn.sock  # the response detaches it from conn when the server closes after the stream
            resp = conn.getresponse()
            if resp.status == 200:
                sock.settimeout(stall_timeout)
                return _read_stream(resp, start, attempt, provider, key, stall_timeout)
            detail = _redact(resp.read(2000).decode(errors="replace"), key)
            if resp.status in (401, 403):
                raise CloudError(f"{provider.name} refused the API key (HTTP {resp.status}); check "
                                 f"${provider.key_env}")
            if resp.status == 429 or resp.status >= 500:
                wait = _retry_after(resp.getheader("Retry-After"))
                last = f"HTTP {resp.status}"
            else:
                message = _error_message(detail)
                raise CloudError(f"{provider.name} rejected the request (HTTP {resp.status}: {message})")
        except (socket.timeout, TimeoutError):
            last = f"no response within {timeout:g}s"
        except (ConnectionError, ssl.SSLError, http.client.HTTPException, OSError) as e:
            if isinstance(e, CloudError):
                raise
            last = f"connection failed ({e.__class__.__name__})"
        finally:
            conn.close()
        if attempt <= retries:
            backoff = wait if wait is not None else 0.5 * 2 ** (attempt - 1) * (1 + random.random() / 4)
            sleep(min(backoff, max_wait))
    raise CloudError(f"{provider.name}: giving up after {retries + 1} attempts ({last})")


def _error_message(detail: str) -> str:
    try:
        data = json.loads(detail)
        message = data.get("message") or data.get("error", {}).get("message") or detail
    except (ValueError, AttributeError):
        message = detail
    return " ".join(str(message).split())[:200]


def _read_stream(resp, start: float, attempt: int, provider: Provider, key: str, stall: float) -> CloudResult:
    text, first, usage, finished, model = [], None, None, False, provider.model
    try:
        while True:
            raw = resp.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                finished = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise CloudError(f"{provider.name} sent a malformed stream event") from None
            model = chunk.get("model", model)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if isinstance(piece, list):  # some servers stream content parts
                    piece = "".join(p.get("text", "") for p in piece if isinstance(p, dict))
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    text.append(piece)
                if choice.get("finish_reason"):
                    finished = True
    except (socket.timeout, TimeoutError):
        raise CloudError(f"{provider.name}: the stream stalled (no data for {stall:g}s)") from None
    except (ConnectionError, http.client.IncompleteRead) as e:
        raise CloudError(f"{provider.name}: the stream was cut ({e.__class__.__name__})") from None
    end = time.perf_counter()
    if not finished:
        raise CloudError(f"{provider.name}: the stream ended before the answer was complete")
    prompt_tokens = (usage or {}).get("prompt_tokens")
    completion_tokens = (usage or {}).get("completion_tokens")
    ttft = (first or end) - start
    out_tps = completion_tokens / (end - first) if completion_tokens and first and end > first else None
    return CloudResult(text=_redact("".join(text), key), ttft_s=ttft, total_s=end - start, output_tok_s=out_tps,
                       prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, attempts=attempt,
                       model=model)


def estimate_image_tokens(provider: Provider, width: int, height: int) -> int:
    """The price estimate's image tokens: patches after fitting the longest side, plus a break per row."""
    patch, max_side = provider.image_tokens["patch"], provider.image_tokens["max_side"]
    scale = min(1.0, max_side / max(width, height))
    cols, rows = math.ceil(width * scale / patch), math.ceil(height * scale / patch)
    return cols * rows + rows
