"""`pocketvlm serve-web`: the mobile web demo (samples/web/) and one ONNX export, served as static files.

The browser does the inference (transformers.js on onnxruntime-web: WebAssembly, or WebGPU where the page finds
it); this server only hands out files, from four places and nothing else:

    /, /app.js, /style.css       the page (samples/web/)
    /vendor/...                  transformers.js's self-contained bundle and onnxruntime-web's .mjs/.wasm, from
                                 samples/web/node_modules (installed with `npm ci`; nothing comes from a CDN)
    /models/<id>/<path>          the files the artifact's pocketvlm.json lists; <id> = quant + a hash of the
                                 manifest, so a re-exported model never meets a stale browser cache
    /samples/<name>.png          the held-out sample images, offered on the page as one-tap pictures
    /demo.json                   what the page needs to start: the model id, its quant, the sample list

Only files inside the artifact are ever served: a manifest that lists a path outside it ('..', an absolute path, a
symlink that leads out) is refused at start. Loopback by default; `--host 0.0.0.0` lets a phone on the same
network open it. Torch-free, standard library only; the HTTP plumbing (bounded workers, timeouts) is runtime/httpd.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from pocketvlm.errors import ArtifactError, PocketVLMError
from pocketvlm.manifest import FILENAME, read_manifest, verify
from pocketvlm.paths import path_arg, user_path

from . import httpd
from .httpd import lan_addresses

PAGE_FILES = ("index.html", "app.js", "style.css")
# what the page imports from node_modules: path under node_modules -> URL under /vendor/
TRANSFORMERS_BUNDLE = "@huggingface/transformers/dist/transformers.min.js"
ORT_DIST = "onnxruntime-web/dist"
ORT_FILE = re.compile(r"ort-wasm-simd-threaded(\.[a-z]+)?\.(mjs|wasm)")
SAMPLES_SHOWN = 12  # held-out pictures offered on the page (the first ones of questions.json: every task in turn)

MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".mjs": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".onnx_data": "application/octet-stream",
    ".png": "image/png",
    ".jinja": "text/plain; charset=utf-8",
}


def web_dir() -> Path:
    """samples/web/ of this installation (the source checkout when installed editable)."""
    import pocketvlm.samples

    return Path(pocketvlm.samples.__file__).resolve().parent / "web"


def npm_command(web: Path) -> str:
    return f"npm ci --prefix {web} --omit=dev --ignore-scripts"


def check_web(web: Path) -> Path:
    """The page's folder, with its npm packages installed; else one line saying what to run."""
    missing = [name for name in PAGE_FILES if not (web / name).is_file()]
    if missing:
        raise PocketVLMError(f"the web demo's page is not in this installation ({web / missing[0]} is missing); "
                             f"run serve-web from a source checkout of pocketvlm (pip install -e .)")
    modules = web / "node_modules"
    if not (modules / TRANSFORMERS_BUNDLE).is_file() or not any(
            ORT_FILE.fullmatch(p.name) for p in (modules / ORT_DIST).glob("*.wasm")):
        raise PocketVLMError(f"the web demo's npm packages are not installed; run: {npm_command(web)}")
    return web


def check_artifact(path: Path) -> dict:
    """An ONNX export, verified against its manifest (sizes and hashes), as every other command checks it."""
    if not path.exists():
        raise ArtifactError(f"{path}: no such folder; export one with: pocketvlm export MODEL --to onnx --out {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a folder; serve-web needs an ONNX export folder")
    manifest = read_manifest(path)
    if manifest is None:
        raise ArtifactError(f"{path}: not a pocketvlm artifact (no {FILENAME}); export one with: "
                            f"pocketvlm export MODEL --to onnx --out DIR")
    if manifest.get("format") != "onnx":
        raise ArtifactError(f"{path}: a {manifest.get('format')!r} artifact; the web demo runs ONNX exports "
                            f"(pocketvlm export MODEL --to onnx --out DIR)")
    check_listed_paths(path, manifest)  # before verify, which would open whatever the manifest names
    verify(path, manifest)
    return manifest


def check_listed_paths(root: Path, manifest: dict) -> None:
    """Every file the manifest lists is a plain relative path that stays inside the artifact once resolved: no
    '..', no absolute path, no symlink out. The server hands these files to anyone who can reach it."""
    real_root = Path(root).resolve()
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ArtifactError(f"{root}: {FILENAME} has no list of files; re-export the artifact")
    for entry in files:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not _plain_relative(rel):
            raise ArtifactError(f"{root}: {FILENAME} lists {str(rel)[:80]!r}, not a plain path inside the artifact; "
                                f"refusing to serve it (re-export the artifact)")
        real = (real_root / rel).resolve()
        if not real.is_relative_to(real_root):
            raise ArtifactError(f"{root}: {rel} leads outside the artifact (to {real}); refusing to serve it "
                                f"(copy the file in instead of linking it)")


def _plain_relative(rel) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return False
    parts = PurePosixPath(rel).parts
    return bool(parts) and not any(part in ("..", ".") or ":" in part for part in parts) and \
        "/".join(parts) == rel


def heldout_dir() -> Path:
    """samples/heldout/ (installed with pocketvlm as package data, unlike the page)."""
    import pocketvlm.samples

    return Path(pocketvlm.samples.__file__).resolve().parent / "heldout"


def samples(limit: int = SAMPLES_SHOWN) -> list[dict]:
    """The first held-out pictures and their questions (no answers: the page is there to find them out)."""
    root = heldout_dir()
    try:
        entries = json.loads((root / "questions.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for entry in entries[:limit]:
        name = Path(entry["image"]).name
        if (root / "images" / name).is_file():
            out.append({"image": f"/samples/{name}", "question": entry["question"], "task": entry.get("task")})
    return out


class WebDemo:
    """What the server hands out: a URL path -> a file (or the generated demo.json)."""

    def __init__(self, artifact: Path, web: Path | None = None):
        self.artifact = user_path(artifact)
        self.manifest = check_artifact(self.artifact)
        self.root = self.artifact.resolve()
        self.web = check_web(web or web_dir())
        digest = hashlib.sha256((self.artifact / FILENAME).read_bytes()).hexdigest()[:12]
        self.model_id = f"{self.manifest.get('quant', 'onnx')}-{digest}"
        self.model_files = {entry["path"] for entry in self.manifest["files"]}
        self.samples = samples()
        self.sample_dir = heldout_dir() / "images"
        modules = self.web / "node_modules"
        self.vendor = {"transformers.min.js": modules / TRANSFORMERS_BUNDLE}
        for p in (modules / ORT_DIST).iterdir():
            if ORT_FILE.fullmatch(p.name):
                self.vendor[f"ort/{p.name}"] = p

    def demo_json(self) -> bytes:
        return json.dumps({
            "model": self.model_id, "quant": self.manifest.get("quant"), "format": self.manifest.get("format"),
            "name": self.root.name, "source": public_source(self.manifest.get("source") or {}),
            "samples": self.samples,
        }).encode()

    def resolve(self, url_path: str) -> Path | None:
        """The file behind a URL path, or None (404). Only listed files: no directory walks, no '..'."""
        path = unquote(url_path)
        if path in ("/", ""):
            path = "/index.html"
        if path.lstrip("/") in PAGE_FILES:
            return self.web / path.lstrip("/")
        if path.startswith("/vendor/"):
            return self.vendor.get(path[len("/vendor/"):])
        if path.startswith(f"/models/{self.model_id}/"):
            rel = path[len(f"/models/{self.model_id}/"):]
            if rel not in self.model_files:
                return None
            # checked again per request: a listed file swapped for a symlink after start is not followed out
            real = (self.root / rel).resolve()
            return real if real.is_relative_to(self.root) else None
        if path.startswith("/samples/"):
            name = path[len("/samples/"):]
            if any(s["image"] == path for s in self.samples):
                return self.sample_dir / name
        return None


def public_source(source: dict) -> str | None:
    """What the page may say about where the model came from: a Hub id or preset name, or only the folder's name
    (the absolute path of a local source is nobody's business on the network)."""
    ident = source.get("id")
    if isinstance(ident, str) and (ident.startswith("preset:") or source.get("revision")):
        return ident
    local = ident if isinstance(ident, str) and ident else source.get("path")
    if not local:
        return None
    return PurePosixPath(str(local).replace("\\", "/")).name or None


def notes(manifest: dict) -> list[str]:
    """What a user should know before opening the page with this export."""
    op = str(((manifest.get("onnx") or {}).get("quantization") or {}).get("op", ""))
    if manifest.get("quant") == "q4" and "GatherBlockQuantized" in op:
        # q4 exports from before the embedding table stayed 8-bit: onnxruntime-web runs GatherBlockQuantized on
        # WebGPU only
        return ["this q4 export stores its embedding table as GatherBlockQuantized, which onnxruntime-web runs on "
                "WebGPU only; re-quantize it (pocketvlm quantize ... --quant q4) to run it on WebAssembly too"]
    return []


def make_handler(demo: WebDemo) -> type[httpd.Handler]:
    class WebHandler(httpd.Handler):
        server_version = "pocketvlm-web"

        def do_GET(self):
            self._send(body=True)

        def do_HEAD(self):
            self._send(body=False)

        def _not_allowed(self):
            self.reply_error(405, f"{self.command} is not allowed (static files: GET and HEAD)",
                             headers={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def extra_headers(self):
            # cross-origin isolation: lets onnxruntime-web use threads where the browser allows them
            # (secure contexts: loopback, https)
            return {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                    "X-Content-Type-Options": "nosniff"}

        def _headers(self, status: int, content_type: str, length: int, cache: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            self.send_header("Cache-Control", cache)
            self.end_headers()

        def _send(self, body: bool) -> None:
            path = urlsplit(self.path).path
            if path == "/demo.json":
                data = demo.demo_json()
                self._headers(200, MIME[".json"], len(data), "no-cache")
                if body:
                    self.wfile.write(data)
                return
            target = demo.resolve(path)
            if target is None or not target.is_file():
                data = b"not found\n"
                self._headers(404, "text/plain; charset=utf-8", len(data), "no-store")
                if body:
                    self.wfile.write(data)
                return
            suffix = target.suffix if target.suffix in MIME else ".onnx"
            # model files sit under a URL that changes with the manifest: safe to keep
            cache = "public, max-age=31536000, immutable" if path.startswith("/models/") else "no-cache"
            with target.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                self._headers(200, MIME[suffix], size, cache)
                if body:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)

    return WebHandler


def make_server(demo: WebDemo, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 8,
                timeout: float = 30.0) -> httpd.HTTPServer:
    # a phone's browser opens ~6 connections at once; idle ones hold no worker
    return httpd.HTTPServer(httpd.parse_bind_host(host), httpd.parse_port(port), make_handler(demo),
                            workers=workers, max_connections=128, request_timeout=timeout, idle_timeout=timeout)


def urls(host: str, port: int) -> list[str]:
    """Where the page can be opened from: loopback, plus every LAN address when bound to all interfaces."""
    if host in ("0.0.0.0", "::", ""):
        lan = lan_addresses() if sys.platform.startswith("linux") else []
        return [f"http://127.0.0.1:{port}/"] + [f"http://{a}:{port}/" for a in lan]
    return [f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"]


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("artifact", type=path_arg,
                        help="an ONNX export folder (pocketvlm export MODEL --to onnx --out DIR)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="IP address to bind (default 127.0.0.1: this machine only; 0.0.0.0: phones on the "
                             "same network; ::1 or :: for IPv6)")
    parser.add_argument("--port", default="8000", help="port (default 8000; 0 picks a free one)")


def main(args) -> int:
    """`pocketvlm serve-web`: check the artifact and the page, serve until Ctrl-C."""
    bind = httpd.parse_bind_host(args.host)
    port = httpd.parse_port(args.port)
    demo = WebDemo(Path(args.artifact))
    server = make_server(demo, bind.host, port)
    where = urls(bind.host, server.server_address[1])
    print(f"pocketvlm: web demo for {args.artifact} ({demo.manifest.get('quant')}) at {where[0]} "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)
    for url in where[1:]:
        print(f"pocketvlm: on a phone on the same network, open {url}", file=sys.stderr, flush=True)
    for note in notes(demo.manifest):
        print(f"pocketvlm: note: {note}", file=sys.stderr, flush=True)
    return httpd.serve_until_interrupted(server)
