"""`pocketvlm bench`: edge measurements per artifact, the cloud leg, costs, and the report."""

from __future__ import annotations

import datetime as dt
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

from pocketvlm.errors import PocketVLMError

from . import cloud as cloud_api
from . import costs, edge, report
from .device import describe_device

DEFAULT_QUESTION = "Describe this image."


def bench_images(images_dir: Path | None, scratch: Path) -> list[Path]:
    """The user's images, or the drawn probe images of `pocketvlm check`, written as PNG."""
    if images_dir:
        from pocketvlm.media import image_files

        return image_files(images_dir)
    from pocketvlm.evaluate import builtin_samples

    paths = []
    for sample in builtin_samples():
        for i, image in enumerate(sample.request.images or []):
            path = scratch / f"{sample.name}{i or ''}.png"
            image.save(path)
            paths.append(path)
    return paths


def _png(path: Path) -> tuple[bytes, tuple[int, int]]:
    from pocketvlm.media import open_image

    image = open_image(path)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), image.size


def cloud_leg(provider: cloud_api.Provider, images: list[Path], question: str, runs: int, max_tokens: int,
              on_run=None, **ask_options) -> dict:
    block = {"provider": provider.id, "name": provider.name, "model": provider.model, "measured": False,
             "price": {"input_per_m": provider.input_per_m, "output_per_m": provider.output_per_m,
                       "date": provider.price_date, "source": provider.price_source}, "records": []}
    key = os.environ.get(provider.key_env)
    pngs = [(p.name, *_png(p)) for p in images]
    if not key:
        block["skipped"] = (f"${provider.key_env} is not set; cloud figures below are estimates from the price "
                            f"data, not measurements")
    else:
        try:
            for name, png, _ in pngs:
                for run in range(runs):
                    r = cloud_api.ask(provider, key, question, [png], max_tokens, **ask_options)
                    cost = (provider.cost(r.prompt_tokens, r.completion_tokens)
                            if r.prompt_tokens is not None and r.completion_tokens is not None else None)
                    rec = {"image": name, "run": run, "ttft_s": r.ttft_s, "e2e_s": r.total_s,
                           "output_tok_s": r.output_tok_s, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens, "cost_usd": cost, "attempts": r.attempts}
                    block["records"].append(rec)
                    if on_run:
                        on_run(rec)
            block["measured"] = True
        except cloud_api.CloudError as e:
            block["error"] = str(e)
    if not block["measured"]:
        text_tokens = round(len(question.split()) * 1.3) + 8  # chat framing; no provider tokenizer offline
        image_tokens = statistics.median(cloud_api.estimate_image_tokens(provider, *size) for _, _, size in pngs)
        prompt = int(text_tokens + image_tokens)
        block["estimate"] = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                             "cost_usd": provider.cost(prompt, max_tokens),
                             "method": f"image tokens: {provider.image_tokens['patch']} px patches after fitting "
                                       f"{provider.image_tokens['max_side']} px, plus row breaks; text ~1.3 "
                                       f"tokens/word; output = {max_tokens} tokens"}
    return block


def bench(artifacts: list[str], *, images_dir: Path | None = None, question: str = DEFAULT_QUESTION, runs: int = 3,
          warmup: int = 1, max_tokens: int = 32, cloud: str | None = "mistral-medium-3", cloud_model: str | None = None,
          cloud_base_url: str | None = None, providers_file: Path | None = None, power_w: float | None = None,
          kwh_price: float | None = None, device_cost: float | None = None, amortize_months: int = 24,
          out: Path | None = None, with_plots: bool = True, device_label: str | None = None,
          threads: int | None = None, progress: bool = True, cloud_options: dict | None = None) -> dict:
    from tqdm import tqdm

    if runs < 1 or warmup < 0 or max_tokens < 2:
        raise PocketVLMError("need --runs >= 1, --warmup >= 0 and --max-tokens >= 2 (decode speed needs 2 tokens)")
    for a in artifacts:
        if not Path(a).exists():
            raise PocketVLMError(f"{a}: no such artifact or model folder")
    provider = (cloud_api.get_provider(cloud, path=providers_file, model=cloud_model, base_url=cloud_base_url)
                if cloud else None)
    device = describe_device(device_label)
    results = {"schema": report.SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "devices": [device], "variants": [], "records": [], "cloud": [],
               "settings": {"question": question, "runs": runs, "warmup": warmup, "max_tokens": max_tokens}}
    with tempfile.TemporaryDirectory(prefix="pocketvlm-bench-") as scratch:
        images = bench_images(images_dir, Path(scratch))
        results["settings"]["images"] = [p.name for p in images]
        per_leg = len(images) * runs
        bar = tqdm(total=per_leg * (len(artifacts) + (1 if provider else 0)), unit="run", disable=not progress,
                   file=sys.stderr)
        for artifact in artifacts:
            bar.set_description(f"edge {Path(artifact).name}")
            got = edge.measure(Path(artifact), images=images, question=question, runs=runs, warmup=warmup,
                               max_tokens=max_tokens, threads=threads, on_run=lambda _: bar.update())
            variant = got["variant"]
            variant["device"] = device["id"]
            base = f"{variant.get('backend', 'failed')}-{variant.get('quant', Path(artifact).name)}"
            taken = {v["id"] for v in results["variants"]}
            variant["id"] = base if base not in taken else f"{base}-{len(taken)}"
            if variant.get("decode_weight_bytes") and device["memory_bandwidth_gbs"]:
                variant["roofline_tok_s"] = device["memory_bandwidth_gbs"] * 1e9 / variant["decode_weight_bytes"]
            results["variants"].append(variant)
            results["records"] += [{"device": device["id"], "variant": variant["id"], "backend": variant.get("backend"),
                                    "quant": variant.get("quant"), "measured": True, **r} for r in got["runs"]]
            if "error" in variant:
                bar.update(per_leg - len(got["runs"]))
                print(f"pocketvlm: {artifact}: {variant['error']}", file=sys.stderr)
        if provider:
            bar.set_description(f"cloud {provider.id}")
            block = cloud_leg(provider, images, question, runs, max_tokens, on_run=lambda _: bar.update(),
                              **(cloud_options or {}))
            bar.update(per_leg - len(block["records"]))
            for message in (block.get("skipped"), block.get("error")):
                if message:
                    print(f"pocketvlm: cloud leg: {message}", file=sys.stderr)
            results["cloud"].append(block)
        bar.close()
    results["costs"] = cost_table(results, power_w, kwh_price, device_cost, amortize_months)
    if out:
        report.write(results, Path(out), with_plots=with_plots)
    return results


def cost_table(results: dict, power_w, kwh_price, device_cost, amortize_months) -> dict:
    cloud_q, measured = None, False
    for c in results["cloud"]:
        measured_costs = [r["cost_usd"] for r in c.get("records", []) if r.get("cost_usd") is not None]
        if measured_costs:
            cloud_q, measured = statistics.median(measured_costs), True
        elif c.get("estimate"):
            cloud_q = c["estimate"]["cost_usd"]
    rows = []
    for row in report.summarize(results):
        if row["error"] or not row["e2e_s"]:
            continue
        edge_q = costs.edge_cost_per_query(row["e2e_s"]["median"], power_w, kwh_price)
        rows.append({"device": row["device"], "variant": row["variant"], "edge_per_query": edge_q,
                     "edge_per_1k": edge_q * 1000 if edge_q is not None else None,
                     "cloud_per_query": cloud_q, "cloud_per_1k": cloud_q * 1000 if cloud_q is not None else None,
                     "cloud_cost_measured": measured,
                     "break_even_queries": costs.break_even_queries(device_cost, edge_q, cloud_q)
                     if cloud_q is not None else None})
    return {"power_w": power_w, "kwh_price": kwh_price, "device_cost": device_cost,
            "amortize_months": amortize_months, "rows": rows}
