"""The `pocketvlm` command. Subcommands only parse arguments and hand over to the module that owns the verb."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_USER_ERROR, PocketVLMError, one_line
from .jsonfile import dumps
from .paths import path_arg


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals as the one line every other error is (the usage goes into the same line)."""

    def error(self, message):
        usage = " ".join(self.format_usage().split())
        print(f"pocketvlm: error: {message} ({usage})", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _checked(text: str, parse, check, not_a: str):
    """An argparse `type`: TEXT parsed (else "'TEXT' is not NOT_A"), then the library's own check, whose
    refusal becomes argparse's one-line error."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {not_a}") from None
    try:
        return check(value)
    except PocketVLMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def thread_count(text: str) -> int:
    """--threads: a positive count no larger than a sane multiple of this machine's cores."""
    from .threads import check_threads

    return _checked(text, int, check_threads, "a whole number")


def image_size_arg(text: str) -> int:
    """--image-size: the longest edge, in pixels, an image is resized to before tiling."""
    from .prompt import check_image_size

    return _checked(text, int, check_image_size, "a whole number of pixels")


IMAGE_SIZE_HELP = ("image budget: the longest edge, in px, images are resized to before they are cut into tiles "
                   "(default: the model's own -- 2048 at SmolVLM2-256M/500M, 4 tiles a side plus a global view; 512 "
                   "is one tile there, ~13x fewer image tokens; 1536 / 384 at 2.2B)")


def image_sizes_arg(text: str) -> list[int]:
    sizes = [image_size_arg(part.strip()) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size, e.g. 512,1024,2048")
    return sorted(set(sizes))


class OneSize(argparse.Action):
    """--image-size on bench: a sweep of one."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [values])


def confidence_arg(text: str) -> float:
    from .router import check_min_confidence

    return _checked(text, float, check_min_confidence, "a number from 0 to 1")


def fallback_timeout_arg(text: str) -> float:
    from .router import check_fallback_timeout

    return _checked(text, float, check_fallback_timeout, "a number of seconds")


PLAIN_HTTP_HELP = ("allow an http:// base URL to a host other than this machine (a server of your own on your "
                   "network): the API key, the questions and the images then cross the network unencrypted. "
                   "Without it, http:// is refused except to localhost, 127.0.0.0/8 and ::1")


def add_fallback_arguments(p) -> None:
    """The router's flags (ask, serve, bench router): on the device first, a cloud API only for unsure answers."""
    g = p.add_argument_group("cloud fallback (opt-in: nothing leaves this machine without --fallback)")
    g.add_argument("--fallback", metavar="PROVIDER",
                   help="send a question the device is unsure about to this provider from the price data "
                        "(e.g. mistral-medium-3.5, openai-compatible); the question and its images only")
    g.add_argument("--min-confidence", type=confidence_arg, metavar="X",
                   help="escalate when the device's confidence in its answer (the least probable answer token's "
                        "probability) is below X: 0 never escalates, 1 always (default 0.5)")
    g.add_argument("--fallback-model", metavar="ID", help="the provider's model id to call, as given")
    g.add_argument("--fallback-base-url", metavar="URL", help="the provider's API base URL (e.g. another "
                                                                 "pocketvlm serve); https://, or http:// to this "
                                                                 "machine (see --allow-plain-http)")
    g.add_argument("--fallback-timeout", type=fallback_timeout_arg, metavar="SECONDS",
                   help="the longest the whole cloud call may take, retries and a slow answer included; past it "
                        "the device's answer is given (default 60, at most 600)")
    g.add_argument("--allow-plain-http", action="store_true", help=PLAIN_HTTP_HELP)
    g.add_argument("--providers", type=path_arg,
                   metavar="FILE", help="a providers JSON file instead of the built-in price data")
    g.add_argument("--no-cloud", action="store_true",
                   help="guarantee nothing leaves this machine (refuses --fallback; also POCKETVLM_OFFLINE=1)")


def _make_model(args) -> int:
    from .make_model import make_model

    out = make_model(args.out, args.preset, seed=args.seed, force=args.force, progress=not args.quiet,
                     train=args.train)
    print(f"wrote {out} ({args.preset}, seed {args.seed}{', trained' if args.train else ''})", file=sys.stderr)
    return 0


def _ask(args) -> int:
    from .media import check_file, load_video, open_image
    from .prompt import Request
    from .router import Fallback, for_terminal, log_line, route
    from .runtime import open_backend

    if args.max_tokens < 1:
        raise PocketVLMError("--max-tokens must be at least 1")
    if args.image and args.video:
        raise PocketVLMError("pass --image or --video, not both")
    # every refusal before the (slow) model load: a typo in an image path or a fallback that cannot work
    fallback = Fallback.configure(args.fallback, model=args.fallback_model, base_url=args.fallback_base_url,
                                  providers_file=args.providers, min_confidence=args.min_confidence,
                                  no_cloud=args.no_cloud, timeout=args.fallback_timeout,
                                  allow_plain_http=args.allow_plain_http)
    images = [open_image(p) for p in args.image]
    if args.video:
        check_file(args.video, "a video")
    backend = open_backend(args.model, threads=args.threads, torch_free=True, image_size=args.image_size,
                           adapter=args.adapter)
    video = None
    if args.video:
        cfg = backend.processor.config
        video = load_video(args.video, fps=cfg.video_fps, max_frames=cfg.video_max_frames)
    request = Request(question=args.question, images=images, video=video)

    def show(step):
        if step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()

    if args.ignore_eos and fallback:
        raise PocketVLMError("--ignore-eos is for timing a model; it does not go with --fallback")
    # with a fallback the answer is known only once the device has finished: it is printed whole, not streamed
    streaming = not args.json and fallback is None
    if args.ignore_eos:
        result = backend.run(request, args.max_tokens, ignore_eos=True, on_step=show if streaming else None)
        routed = None
    else:
        routed = route(backend, request, args.max_tokens, fallback, on_step=show if streaming else None)
        result = routed.device
        if fallback is not None:
            print(f"pocketvlm: {log_line(routed, len(images))}", file=sys.stderr)
    if args.json:
        print(dumps({"model": str(args.model), **result.to_json(),
                     **({"answer": routed.answer, **routed.to_json()} if routed else {})}))
        return 0
    if not streaming:  # the answer may be a server's text: nothing in it may steer the terminal
        sys.stdout.write(for_terminal(routed.answer))
    print()
    t = result.timings
    parts = [f"{result.backend} {result.quant}", f"load {t.load_s:.2f}s"]
    if t.encode_s is not None:
        parts.append(f"encode {t.encode_s:.2f}s")
    if result.image_tiles:
        parts.append(f"{result.image_tiles} tile{'s' if result.image_tiles > 1 else ''} / {result.image_tokens} "
                     f"image tok")
    parts.append(f"ttft {t.ttft_s:.2f}s")
    if t.prefill_tok_s:
        parts.append(f"prefill {t.prefill_tok_s:.0f} tok/s ({result.prompt_tokens} tok)")
    if t.decode_tok_s:
        parts.append(f"decode {t.decode_tok_s:.1f} tok/s ({len(result.token_ids)} tok)")
    if routed:
        parts.append(f"confidence {routed.confidence:.2f}")
    print("[" + " · ".join(parts) + "]", file=sys.stderr)
    return 0


def _export(args) -> int:
    from pocketvlm import formats
    from pocketvlm.export import export_model

    options = {name: getattr(args, name) for name in formats.all_options()}
    out = export_model(args.source, args.to, Path(args.out), quant=args.quant, force=args.force,
                       progress=not args.quiet, image_size=args.image_size, **options)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _quantize(args) -> int:
    from pocketvlm.quantize import quantize_artifact

    out = quantize_artifact(Path(args.artifact), args.quant, Path(args.out), force=args.force,
                            progress=not args.quiet)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    from pocketvlm.runtime import server

    return server.main(args)


def _serve_web(args) -> int:
    from pocketvlm.runtime import web

    return web.main(args)


def _bench(args) -> int:
    from pocketvlm.bench_device import report
    from pocketvlm.bench_device.bench import bench

    results = bench(args.targets, images_dir=Path(args.images) if args.images else None, question=args.question,
                    runs=args.runs, warmup=args.warmup, max_tokens=args.max_tokens,
                    cloud=None if args.cloud == "none" else args.cloud, cloud_model=args.cloud_model,
                    cloud_base_url=args.cloud_base_url, allow_plain_http=args.allow_plain_http,
                    providers_file=args.providers, power_w=args.power_w,
                    kwh_price=args.kwh_price, device_cost=args.device_cost, amortize_months=args.amortize_months,
                    out=Path(args.out) if args.out else None, with_plots=not args.no_plots,
                    device_label=args.device_label, threads=args.threads, progress=not args.quiet,
                    image_sizes=args.image_sizes, force=args.force)
    print(report.markdown(results))
    if args.out:
        print(f"wrote {args.out}/results.json, report.md and plots", file=sys.stderr)
    return 0


def _bench_router(args) -> int:
    from pocketvlm.bench_device import router as sweep
    from pocketvlm.router import Fallback

    if args.fallback is None:
        raise PocketVLMError("bench router needs --fallback PROVIDER: the cloud it would escalate to")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise PocketVLMError(f"--target-accuracy {args.target_accuracy}: give a share from 0 to 1")
    fallback = Fallback.configure(args.fallback, model=args.fallback_model, base_url=args.fallback_base_url,
                                  providers_file=args.providers, no_cloud=args.no_cloud,
                                  timeout=args.fallback_timeout, allow_plain_http=args.allow_plain_http)
    thresholds = sweep.DEFAULT_THRESHOLDS
    if args.thresholds:
        from pocketvlm.router import check_min_confidence

        try:
            thresholds = sorted({check_min_confidence(float(t)) for t in args.thresholds.split(",")})
        except ValueError:
            raise PocketVLMError(f"--thresholds {args.thresholds!r}: give numbers from 0 to 1, comma-separated") \
                from None
    results = sweep.run(args.model, fallback, samples_file=Path(args.samples) if args.samples else None,
                        thresholds=thresholds, target_accuracy=args.target_accuracy, max_tokens=args.max_tokens,
                        out=Path(args.out) if args.out else None, threads=args.threads,
                        image_size=args.image_size, progress=not args.quiet, force=args.force)
    print(sweep.markdown(results))
    if results["cloud_error"]:  # the device's answers are kept (README), but there is no sweep to report
        kept = f"; the device's answers are kept in {args.out}/results.json" if args.out else ""
        raise PocketVLMError(f"bench router: the cloud leg failed ({results['cloud_error']}), so there is no "
                             f"threshold sweep{kept}")
    if args.out:
        print(f"wrote {args.out}/results.json, report.md, router.png", file=sys.stderr)
    return 0


def _bench_report(args) -> int:
    from pocketvlm.bench_device import report

    inputs = [Path(p) for p in args.results]
    report.check_out(Path(args.out), force=args.force, inputs=inputs)  # before reading: never over an input
    merged = report.load(inputs)
    written = report.write(merged, Path(args.out), with_plots=not args.no_plots, force=args.force, inputs=inputs)
    print(report.markdown(merged))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from pocketvlm.demo import run_demo

    formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
    run_demo(args.model, Path(args.out) if args.out else None, formats=formats, questions=args.questions,
             cloud=None if args.cloud == "none" else args.cloud, progress=not args.quiet, image_size=args.image_size)
    return 0


def _check(args) -> int:
    from pocketvlm.quantize.fidelity import check, render

    def progress(row):
        if not args.json:
            print(f"  {row['sample']}: prefix {row['matching_prefix']}/{row['tokens']}, "
                  f"KLD {row['kld_mean']:.2e}, top-1 {row['top1']:.3f}", file=sys.stderr)

    if args.report:  # checked before the (long) check: never into what is read, never half-written
        written = Path(args.report).resolve()
        for given, inside in ((args.artifact, True), (args.reference, True), (args.samples, False),
                              (args.images, written.exists())):  # folders whose files are listed or read
            if given and (written == Path(given).resolve() or inside and written.is_relative_to(Path(given).resolve())):
                raise PocketVLMError(f"--report {args.report} would write into {given}, which check reads; "
                                     f"choose a file elsewhere")
        if written.is_dir():
            raise PocketVLMError(f"--report {args.report} is a folder; give a file name")
        if not written.parent.is_dir():
            raise PocketVLMError(f"--report {args.report}: no folder {written.parent}")
    report = check(Path(args.artifact), reference=args.reference,
                   samples_file=Path(args.samples) if args.samples else None,
                   images_dir=Path(args.images) if args.images else None, max_tokens=args.max_tokens,
                   progress=progress, image_size=args.image_size)
    if args.report:
        tmp = Path(args.report).with_name(f".{Path(args.report).name}.partial")
        tmp.write_text(dumps(report) + "\n")
        os.replace(tmp, args.report)
    print(dumps(report) if args.json else render(report))
    return 0 if report["pass"] else 1


def cloud_help() -> str:
    """--cloud's help: the providers as the built-in price data has them on the run's date (names, stages and
    lifecycles are data, never written here)."""
    from pocketvlm.bench_device.providers import cloud_help as from_the_data

    return from_the_data() + "; or 'none'"


def build_parser() -> argparse.ArgumentParser:
    from . import formats
    from .presets import preset, preset_names

    parser = Parser(
        prog="pocketvlm",
        description="Ship SmolVLM2 onto devices: make test models, ask questions about images and videos offline.",
    )
    parser.add_argument("--version", action="version", version=f"pocketvlm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its whole chain of causes (tracebacks) before the one-line message "
                             "(also POCKETVLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    presets_help = "; ".join(f"{n}: {preset(n)['summary']}" for n in preset_names())
    p = sub.add_parser(
        "make-model", help="write a random-weight SmolVLM2 model folder (tests, timings)",
        description="Write a complete Hugging Face SmolVLM2 folder with random weights and a locally trained "
                    "tokenizer. The real-shape presets match the published checkpoints exactly, so exports, sizes "
                    "and timings are real; answers are not. Presets: " + presets_help)
    p.add_argument("out", type=path_arg, help="output folder (refused if it exists and is not empty, unless --force)")
    p.add_argument("--preset", choices=preset_names(), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer corpus (default: 0)")
    p.add_argument("--train", action="store_true",
                   help="train it on the synthetic image-QA set (micro preset; ~8 minutes on 2 cores) and "
                        "record its held-out accuracy in the manifest")
    p.add_argument("--force", action="store_true", help="replace OUT once the new folder is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_make_model)

    p = sub.add_parser(
        "ask", help="answer a question about an image or video, offline",
        description="Answer QUESTION about images or a video with MODEL: a Hugging Face SmolVLM2 folder, a Hub id "
                    "already in the local cache, or a pocketvlm artifact. Streams the answer to stdout; timings go "
                    "to stderr (or into --json).")
    p.add_argument("model", type=path_arg, help="model folder, Hub id, or exported artifact")
    p.add_argument("question", help="the question, in plain text")
    p.add_argument("--image", type=path_arg, action="append", default=[], metavar="IMG",
                   help="an image file (repeat for several images)")
    p.add_argument("--video", type=path_arg,
                   metavar="VID", help="a video file; frames are sampled as SmolVLM2 samples them")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens tokens (for timing random-weight models)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the engine's choice)")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", help=IMAGE_SIZE_HELP)
    p.add_argument("--adapter", type=path_arg, metavar="DIR",
                   help="apply this LoRA adapter artifact (pocketvlm export FINETUNED/adapter --to gguf|mlx) to MODEL, "
                        "a gguf or mlx artifact of the base it was trained on")
    add_fallback_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: answer, token_ids, token_probs, image_tiles, image_tokens, backend, "
                        "quant, timings")
    p.set_defaults(func=_ask)

    p = sub.add_parser(
        "export", help="convert a SmolVLM2 checkpoint to gguf / mlx / onnx / coreml",
        description="Convert SOURCE (a Hugging Face SmolVLM2 folder, or a Hub id in the local cache) into an "
                    "artifact folder for one engine, quantized as asked, with a pocketvlm.json manifest written "
                    "last. The folder appears only when complete.")
    p.add_argument("source", type=path_arg, help="Hugging Face model folder or Hub id")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help=", ".join(f"{f.name}: {f.title}" for f in sorted(formats.EXPORT_FORMATS.values(),
                                                                          key=lambda f: f.name)))
    p.add_argument("--quant", help=formats.quant_help("export"))
    p.add_argument("--out", type=path_arg, required=True, help="output folder (refused if not empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT once the new artifact is complete")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX",
                   help=IMAGE_SIZE_HELP.replace("image budget:", "the artifact's default image budget (written into "
                                                "its processor config, so every consumer tiles the same way):"))
    for option, _ in formats.all_options().values():
        p.add_argument(*option.flags, **option.argparse_kwargs())
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "demo", help="the main job, offline: the embedded model through every format, accuracy and speed",
        description="Take the embedded micro SmolVLM2 (trained on synthetic image QA), export it to every format "
                    "and quant this machine can produce, ask the held-out questions through every backend that "
                    "runs here, and print one table: format x quant x size x accuracy x agreement with the "
                    "reference x TTFT x decode speed, plus the edge-vs-cloud line. Writes report.md, results.json "
                    "and plots to a new folder named at the end.")
    p.add_argument("--model", type=path_arg, help="run on this model instead (a real SmolVLM2 folder or cached Hub id)")
    p.add_argument("--out", type=path_arg, help="report folder (default: ./pocketvlm-demo-<time>)")
    p.add_argument("--formats", help="comma-separated subset of formats (default: all available)")
    p.add_argument("--questions", type=int, default=40,
                   help="held-out questions to ask, tasks in turn (default 40 = 10 per task; 200 asks them all — "
                        "quantized MLX on Linux takes ~2 s a question)")
    p.add_argument("--cloud", default="default", help=cloud_help())
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", help=IMAGE_SIZE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "serve", help="serve a model as an OpenAI-compatible chat endpoint (loopback by default)",
        description="Serve MODEL at http://HOST:PORT/v1/chat/completions (streamed or not) and /v1/models, so "
                    "OpenAI- or Mistral-style clients can use the on-device model. Images as data: URLs only; "
                    "greedy decoding; one request at a time. Loopback by default; another address needs an API "
                    "key (POCKETVLM_API_KEY) or --insecure.")
    from pocketvlm.runtime import server as serve_verb  # the module owns its options (mlx-lm style)

    serve_verb.add_arguments(p)
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for the engine")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", help=IMAGE_SIZE_HELP)
    add_fallback_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "serve-web", help="serve the mobile web demo with an ONNX export (the browser runs the model)",
        description="Serve the web demo page (samples/web/) and ARTIFACT, an ONNX export, at http://HOST:PORT/. "
                    "The browser runs the model itself with transformers.js on onnxruntime-web (WebAssembly, or "
                    "WebGPU where available); every file comes from this server, nothing from a CDN. Needs the "
                    "page's npm packages (npm ci --prefix samples/web).")
    from pocketvlm.runtime import web as serve_web_verb

    serve_web_verb.add_arguments(p)
    p.set_defaults(func=_serve_web)

    p = sub.add_parser(
        "quantize", help="quantize an exported artifact further (same format)",
        description="Write a lower-bit copy of ARTIFACT (e.g. a GGUF f16 export to q4_k_m) with its own manifest. "
                    "Run `pocketvlm check` on the result to see what the quantization cost.")
    p.add_argument("artifact", type=path_arg, help="an exported artifact folder")
    p.add_argument("--quant", required=True, help=formats.quant_help("quantize"))
    p.add_argument("--out", type=path_arg, required=True, help="output folder (refused if not empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT once the new artifact is complete")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_quantize)

    bench = sub.add_parser(
        "bench", help="edge latency/memory per backend and quant, against a hosted API (latency and cost)",
        description="`pocketvlm bench [run] ARTIFACT...` measures artifacts against a hosted API; "
                    "`pocketvlm bench report RESULTS.json... --out DIR` merges results from several devices.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True, parser_class=Parser)
    p = bench_sub.add_parser(
        "run", help="measure artifacts (the default: `pocketvlm bench ARTIFACT...` means `bench run ARTIFACT...`)",
        description="Measure each ARTIFACT (any exported format/quant, or a Hugging Face folder on the reference "
                    "backend) in its own process: cold load, image encode, time to first token, prefill and decode "
                    "speed (a fixed number of tokens, end of sequence ignored), end-to-end latency, peak RSS, size "
                    "on disk, and decode as a fraction of the memory-bandwidth roofline. Then the cloud leg: the "
                    "same requests to the provider (key from its env var; without one, estimates labelled as "
                    "such). Cost per 1k queries at standard and batch prices, and break-even against the device, "
                    "for the current model and Mistral Medium 3's last price; a retired model is measured on its "
                    "successor.")
    p.add_argument("targets", type=path_arg, nargs="+", metavar="ARTIFACT", help="artifacts / model folders")
    p.add_argument("--images", type=path_arg,
                   metavar="DIR", help="images to ask about (default: built-in probe images)")
    p.add_argument("--question", default="Describe this image.", help="the question (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per image (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--cloud", default="default", help=cloud_help())
    p.add_argument("--cloud-model", help="send this model id as given, never swapped for a successor; an id in the "
                                         "price data brings its own price and lifecycle (e.g. mistral-medium-3-5)")
    p.add_argument("--cloud-base-url", metavar="URL",
                   help="override the provider's API base URL: https://, or http:// to this machine (see "
                        "--allow-plain-http)")
    p.add_argument("--allow-plain-http", action="store_true", help=PLAIN_HTTP_HELP)
    p.add_argument("--providers", type=path_arg,
                   help="a providers JSON file (schema pocketvlm.providers/2; start from a copy of "
                                       "pocketvlm/data/providers.json)")
    p.add_argument("--power-w", type=float, help="device power draw while answering, in watts (edge energy cost)")
    p.add_argument("--kwh-price", type=float, default=0.30, help="electricity price, $/kWh (default 0.30)")
    p.add_argument("--device-cost", type=float, help="device price in $, for the break-even volume")
    p.add_argument("--amortize-months", type=int, default=24, help="months the device cost is spread over (24)")
    p.add_argument("--device-label", help="name for this device in merged reports")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for the engines")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", dest="image_sizes",
                   action=OneSize, help=IMAGE_SIZE_HELP)
    p.add_argument("--image-sizes", type=image_sizes_arg, metavar="PX,PX,...",
                   help="sweep the image budget: measure every artifact at each size (e.g. 512,1024,2048) and report "
                        "TTFT, prompt tokens, peak RSS and agreement with the reference at each, with a plot")
    p.add_argument("--out", type=path_arg,
                   help="write results.json, report.md and PNG plots to this new folder (refused if not "
                                 "empty, unless --force)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--force", action="store_true",
                   help="replace OUT, if it is an earlier pocketvlm output, once the new one is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)


    p = bench_sub.add_parser(
        "router", help="sweep the router's --min-confidence on labelled questions: accuracy, share escalated, cost",
        description="Answer every labelled question on the device (with its confidence) and once in the cloud "
                    "(--fallback), then for each --min-confidence threshold: accuracy, share escalated, $ per 1k "
                    "queries, p50/p95 latency, and the threshold that reaches --target-accuracy at least cost. "
                    "Writes results.json, report.md and router.png (accuracy against cost) with --out.")
    p.add_argument("model", type=path_arg, help="the on-device model or artifact")
    p.add_argument("--samples", type=path_arg,
                   help="JSON list of {image, question, answer} (default: the held-out split)")
    p.add_argument("--thresholds", help="comma-separated thresholds from 0 to 1 (default: 0, 0.1, ..., 0.9, 0.95, "
                                        "0.99, 1)")
    p.add_argument("--target-accuracy", type=float, default=0.95,
                   help="the accuracy to reach at least cost (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (default 8)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for the engine")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", help=IMAGE_SIZE_HELP)
    p.add_argument("--out", type=path_arg,
                   help="write results.json, report.md and router.png to this new folder (refused if not "
                                 "empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT, if it is an earlier pocketvlm output, once the new one is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_fallback_arguments(p)
    p.set_defaults(func=_bench_router)

    p = bench_sub.add_parser(
        "report", help="merge results.json files from several devices into one report",
        description="Merge bench results recorded on several devices (each `bench --out` writes results.json) "
                    "into one report.md, results.json and plots.")
    p.add_argument("results", type=path_arg, nargs="+", metavar="RESULTS.json", help="results files to merge")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR",
                   help="write the merged results.json, report.md and plots to this new folder (refused if not empty, "
                        "unless --force; never one holding an input)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--force", action="store_true",
                   help="replace OUT, if it is an earlier pocketvlm output, once the new one is complete")
    p.set_defaults(func=_bench_report)

    p = sub.add_parser(
        "check", help="fidelity of an artifact against the PyTorch reference",
        description="Run the same requests through ARTIFACT and the fp32 PyTorch reference: greedy tokens "
                    "(exact match and matching prefix), and teacher-forced KL divergence and top-1 agreement per "
                    "step. Gated by thresholds per format and quant (pocketvlm/data/fidelity.json); exits 1 when a "
                    "gate fails.")
    p.add_argument("artifact", type=path_arg, help="an exported artifact folder")
    p.add_argument("--reference", type=path_arg,
                   help="the original model folder (default: the source recorded in the manifest)")
    p.add_argument("--samples", type=path_arg,
                   help="JSON list of {image, question, answer?} (default: built-in probes)")
    p.add_argument("--images", type=path_arg,
                   metavar="DIR", help="also ask 'Describe this image.' about every image in DIR")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens compared per sample (default: 32)")
    p.add_argument("--image-size", type=image_size_arg, metavar="PX", help=IMAGE_SIZE_HELP + "; both sides use it")
    p.add_argument("--report", type=path_arg, metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_check)

    from . import finetune
    p = sub.add_parser("finetune", help=finetune.HELP, description=finetune.DESCRIPTION)
    finetune.add_arguments(p)
    p.set_defaults(func=finetune.main)
    return parser


def _default_subcommands(argv: list[str]) -> list[str]:
    """`pocketvlm bench ARTIFACT...` is `pocketvlm bench run ARTIFACT...` (the form README and users have)."""
    argv = list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench":
        rest = argv[command + 1:]
        if rest and rest[0] not in ("run", "report", "router", "-h", "--help"):
            argv.insert(command + 1, "run")
    return argv


def debug_enabled(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("POCKETVLM_DEBUG", "").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    from . import interrupts

    interrupts.install()
    args = build_parser().parse_args(_default_subcommands(sys.argv[1:] if argv is None else argv))
    try:
        status = args.func(args)
        interrupts.check()  # a stop signal whose exception a finaliser swallowed: exit as stopped
        return status
    except PocketVLMError as e:
        if debug_enabled(args):
            import traceback

            traceback.print_exception(e)  # with __cause__ / __context__: where it came from, in full
        print(f"pocketvlm: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pocketvlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
