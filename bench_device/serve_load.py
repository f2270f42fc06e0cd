"""`pocketvlm serve` under load: N concurrent clients mixing valid and malformed requests for a fixed time.

    python -m pocketvlm.bench_device.serve_load MODEL [--clients 16] [--seconds 60] [--malformed 0.5]
                                                [--max-tokens 8] [--workers 8] [--json FILE]

Starts `pocketvlm serve MODEL --port 0` in its own process on loopback (an API key from POCKETVLM_API_KEY, as a
user would), then runs the clients: valid chat requests (text, an image, streamed) and GET /v1/models, mixed with
the malformed and hostile requests of tests/test_adversarial_serve.py (bad JSON, wrong key, unknown route, a pixel
bomb, Content-Length: abc, a garbage request line, a half-sent head dropped, a cross-origin page, a foreign Host).
Each kind has the status it must get. It reports requests served, statuses, anything unexpected, p50/p95 latency
per kind, the server's RSS and thread count (sampled from /proc while it runs; peak RSS is VmHWM), that the
server answers normally afterwards, and its exit status after Ctrl-C. Exit 1 when anything was unexpected.

A benchmark, not a test: nothing here asserts a time. Only loopback traffic; every loop ends with the deadline.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

HOST = "127.0.0.1"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _sample_image() -> bytes:
    import pocketvlm.samples

    images = sorted((Path(pocketvlm.samples.__file__).parent / "heldout" / "images").glob("*.png"))
    return images[0].read_bytes()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Kinds:
    """Every request kind: its expected status and how it is sent (over the client's keep-alive connection, or
    over a raw socket of its own)."""

    def __init__(self, key: str, max_tokens: int):
        self.key = key
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        image = _url(_sample_image())
        bomb = _url(_png_header_only(8000, 8000))

        def body(content, **extra) -> bytes:
            return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                               **extra}).encode()

        # name: (valid?, expected status, method, path, body, extra headers)
        self.http = {
            "chat": (True, 200, "POST", "/v1/chat/completions", body("What color is the circle?"), auth),
            "chat+image": (True, 200, "POST", "/v1/chat/completions",
                           body([{"type": "image_url", "image_url": {"url": image}},
                                 {"type": "text", "text": "What color is the circle?"}]), auth),
            "stream": (True, 200, "POST", "/v1/chat/completions", body("How many?", stream=True), auth),
            "models": (True, 200, "GET", "/v1/models", None, auth),
            "bad-json": (False, 400, "POST", "/v1/chat/completions", b"{not json", auth),
            "array-body": (False, 400, "POST", "/v1/chat/completions", b"[1, 2]", auth),
            "deep-json": (False, 400, "POST", "/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000, auth),
            "surrogate": (False, 400, "POST", "/v1/chat/completions", body("\ud800"), auth),
            "max-tokens-0": (False, 400, "POST", "/v1/chat/completions",
                             json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
                             auth),
            "remote-image": (False, 400, "POST", "/v1/chat/completions",
                             body([{"type": "image_url", "image_url": "https://example.com/x.png"},
                                   {"type": "text", "text": "hi"}]), auth),
            "bad-base64": (False, 400, "POST", "/v1/chat/completions",
                           body([{"type": "image_url", "image_url": "data:image/png;base64,@@@"},
                                 {"type": "text", "text": "hi"}]), auth),
            "pixel-bomb": (False, 413, "POST", "/v1/chat/completions",
                           body([{"type": "image_url", "image_url": {"url": bomb}}] * 4
                                + [{"type": "text", "text": "hi"}]), auth),
            "wrong-key": (False, 401, "POST", "/v1/chat/completions", body("hi"),
                          {**auth, "Authorization": "Bearer not-the-key"}),
            "no-route": (False, 404, "POST", "/v1/nothing", body("hi"), auth),
            "cross-origin": (False, 403, "POST", "/v1/chat/completions", body("hi"),
                             {**auth, "Origin": "http://evil.example"}),
            "foreign-host": (False, 403, "GET", "/v1/models", None, {**auth, "Host": "evil.example"}),
        }
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
        # name: (expected status or None for "no answer expected", bytes to send, close after sending?)
        self.raw = {
            "content-length-abc": (400, (head + "Content-Length: abc\r\n\r\n{}").encode(), False),
            "huge-declared-body": (413, (head + f"Content-Length: {65 << 20}\r\n\r\n").encode(), False),
            "garbage-line": (400, b"\x16\x03\x01 hello\r\n\r\n", False),
            "half-head-dropped": (None, b"POST /v1/chat/comp", True),
        }
        self.valid = [k for k, v in self.http.items() if v[0]]
        self.malformed = [k for k, v in self.http.items() if not v[0]] + list(self.raw)

    def expected(self, kind: str):
        return self.http[kind][1] if kind in self.http else self.raw[kind][0]


class Client(threading.Thread):
    def __init__(self, index: int, port: int, kinds: Kinds, malformed_share: float, deadline: float,
                 timeout: float):
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(index)  # the same mix on every run
        self.port, self.kinds, self.share, self.deadline, self.timeout = port, kinds, malformed_share, deadline, \
            timeout
        self.records: list[tuple[str, object, float]] = []  # (kind, status | "ExceptionName" | None, seconds)
        self.conn: http.client.HTTPConnection | None = None

    def run(self):
        while time.monotonic() < self.deadline:
            pool = self.kinds.malformed if self.rng.random() < self.share else self.kinds.valid
            kind = self.rng.choice(pool)
            start = time.monotonic()
            try:
                status = self._http(kind) if kind in self.kinds.http else self._raw(kind)
            except (OSError, http.client.HTTPException) as e:
                status = e.__class__.__name__
                self._drop()
            self.records.append((kind, status, time.monotonic() - start))
        self._drop()

    def _drop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _http(self, kind: str):
        _, _, method, path, body, headers = self.kinds.http[kind]
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        headers = dict(headers)
        host = headers.pop("Host", None)
        if host:
            self.conn.putrequest(method, path, skip_host=True)
            self.conn.putheader("Host", host)
            for key, value in headers.items():
                self.conn.putheader(key, value)
            self.conn.endheaders()
        else:
            self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status == 200 and kind == "stream" and not data.rstrip().endswith(b"data: [DONE]"):
            return "StreamCut"
        if response.status >= 400:
            try:
                if "error" not in json.loads(data):
                    return "NotJSONError"
            except ValueError:
                return "NotJSONError"
        if response.will_close:
            self._drop()
        return response.status

    def _raw(self, kind: str):
        expected, data, close_after = self.kinds.raw[kind]
        with socket.create_connection((HOST, self.port), timeout=self.timeout) as sock:
            sock.sendall(data)
            if close_after:
                return None
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
        return int(match.group(1)) if match else "NoStatusLine"


class Sampler(threading.Thread):
    """The server's RSS and thread count from /proc, a few times a second (Linux; elsewhere, nothing)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.samples: list[tuple[int, int]] = []

    def status(self) -> dict[str, int]:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0]) * (1024 if key != "Threads" else 1)
        return out

    def run(self):
        while not self.stop.wait(0.2):
            s = self.status()
            if s:
                self.samples.append((s["VmRSS"], s["Threads"]))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_server(model: str, key: str, workers: int, timeout: float, log: list[str]):
    env = {**os.environ, "POCKETVLM_API_KEY": key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketvlm", "serve", model, "--port", "0", "--workers", str(workers),
         "--timeout", str(timeout)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    while True:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            raise SystemExit(f"serve_load: the server did not start:\n{''.join(log)}")
        log.append(line)
        match = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        if match:
            break
    threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return proc, int(match.group(1))


def check_after(port: int, kinds: Kinds) -> dict:
    """A normal request after the storm: the answer, status and whether it took the normal path."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        _, _, method, path, body, headers = kinds.http["chat+image"]
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = json.loads(response.read())
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {kinds.key}"})
        models = conn.getresponse()
        models.read()
        return {"chat_status": response.status, "answer": data["choices"][0]["message"]["content"]
                if response.status == 200 else None, "models_status": models.status}
    finally:
        conn.close()


def run(model: str, *, clients: int = 16, seconds: float = 60.0, malformed: float = 0.5, max_tokens: int = 8,
        workers: int = 8, timeout: float = 30.0) -> dict:
    key = secrets.token_hex(16)
    kinds = Kinds(key, max_tokens)
    log: list[str] = []
    proc, port = start_server(model, key, workers, timeout, log)
    sampler = Sampler(proc.pid)
    try:
        warm = check_after(port, kinds)  # the first answer loads lazy parts of the engine: not the baseline
        start_status = sampler.status()
        sampler.start()
        deadline = time.monotonic() + seconds
        threads = [Client(i, port, kinds, malformed, deadline, timeout=timeout + 30) for i in range(clients)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        sampler.stop.set()
        sampler.join()
        after = check_after(port, kinds)
        end_status = sampler.status()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()

    records = [r for t in threads for r in t.records]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    unexpected: Counter = Counter()
    for kind, status, took in records:
        by_kind[kind][str(status)] += 1
        latency[kind].append(took)
        if status != kinds.expected(kind):
            unexpected[f"{kind}: {status}"] += 1
    statuses = Counter(str(s) for _, s, _ in records)
    valid = [took for kind, _, took in records if kind in kinds.valid]
    bad = [took for kind, _, took in records if kind not in kinds.valid]
    rss = [s[0] for s in sampler.samples]
    thread_counts = [s[1] for s in sampler.samples]
    server_log = "".join(log)
    return {
        "model": model, "banner": log[0].strip() if log else "", "clients": clients, "seconds": seconds,
        "elapsed_s": round(elapsed, 2), "malformed_share": malformed, "max_tokens": max_tokens, "workers": workers,
        "requests": len(records), "requests_per_s": round(len(records) / elapsed, 1),
        "valid_requests": len(valid), "malformed_requests": len(bad),
        "statuses": dict(sorted(statuses.items())), "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "unexpected": dict(unexpected),
        "latency_ms": {kind: {"p50": round(_percentile(v, 0.5) * 1e3, 1), "p95": round(_percentile(v, 0.95) * 1e3, 1),
                              "n": len(v)} for kind, v in sorted(latency.items())},
        "latency_valid_ms": {"p50": _ms(_percentile(valid, 0.5)), "p95": _ms(_percentile(valid, 0.95))},
        "latency_malformed_ms": {"p50": _ms(_percentile(bad, 0.5)), "p95": _ms(_percentile(bad, 0.95))},
        "server": {"rss_start_mb": _mb(start_status.get("VmRSS")), "rss_peak_sampled_mb": _mb(max(rss, default=None)),
                   "rss_end_mb": _mb(end_status.get("VmRSS")), "peak_rss_mb": _mb(end_status.get("VmHWM")),
                   "threads_start": start_status.get("Threads"), "threads_peak": max(thread_counts, default=None),
                   "threads_end": end_status.get("Threads"), "tracebacks": server_log.count("Traceback"),
                   "exit_code": code},
        "before": warm, "after": after,
        "ok": not unexpected and after["chat_status"] == 200 and after["models_status"] == 200 and code == 0
        and "Traceback" not in server_log,
    }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1e3, 1)


def _mb(value):
    return None if value is None else round(value / 2 ** 20, 1)


def render(r: dict) -> str:
    s = r["server"]
    lines = [
        f"serve under load: {r['banner'].removeprefix('pocketvlm: ')}",
        f"{r['clients']} clients x {r['seconds']:g} s ({r['elapsed_s']} s), {r['malformed_share']:.0%} malformed, "
        f"max_tokens {r['max_tokens']}, {r['workers']} workers",
        f"requests: {r['requests']} ({r['requests_per_s']}/s): {r['valid_requests']} valid, "
        f"{r['malformed_requests']} malformed",
        "statuses: " + ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
        f"unexpected: {sum(r['unexpected'].values())}" + (f" ({r['unexpected']})" if r["unexpected"] else ""),
        f"latency, valid: p50 {r['latency_valid_ms']['p50']} ms, p95 {r['latency_valid_ms']['p95']} ms; "
        f"malformed: p50 {r['latency_malformed_ms']['p50']} ms, p95 {r['latency_malformed_ms']['p95']} ms",
        f"server RSS: {s['rss_start_mb']} MB at start, {s['rss_peak_sampled_mb']} MB peak sampled, "
        f"{s['rss_end_mb']} MB at end, peak (VmHWM) {s['peak_rss_mb']} MB",
        f"server threads: {s['threads_start']} at start, {s['threads_peak']} peak, {s['threads_end']} at end; "
        f"tracebacks in its log: {s['tracebacks']}",
        f"after the run: chat {r['after']['chat_status']} ({r['after']['answer']!r}), models "
        f"{r['after']['models_status']}; Ctrl-C exit {s['exit_code']}",
        "",
        "| kind | n | statuses | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    for kind, lat in r["latency_ms"].items():
        statuses = ", ".join(f"{k}×{v}" for k, v in r["by_kind"][kind].items())
        lines.append(f"| {kind} | {lat['n']} | {statuses} | {lat['p50']} | {lat['p95']} |")
    lines.append("")
    lines.append("OK" if r["ok"] else "NOT OK: see unexpected statuses, the server's exit code and its log")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pocketvlm.bench_device.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("model", help="what `pocketvlm serve` serves (samples/micro, a make-model folder, an artifact)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients run (default 60)")
    p.add_argument("--malformed", type=float, default=0.5, help="share of malformed requests (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the valid chat requests (default 8)")
    p.add_argument("--workers", type=int, default=8, help="the server's --workers (default 8)")
    p.add_argument("--timeout", type=float, default=30.0, help="the server's --timeout (default 30)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = p.parse_args(argv)
    result = run(args.model, clients=args.clients, seconds=args.seconds, malformed=args.malformed,
                 max_tokens=args.max_tokens, workers=args.workers, timeout=args.timeout)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
