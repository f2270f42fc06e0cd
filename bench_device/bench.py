"""`pocketvlm bench`: edge measurements per artifact, the cloud leg, costs, and the report."""

from __future__ import annotations

import datetime as dt
import io
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

from pocketvlm.errors import PocketVLMError

from . import cloud as cloud_api
from . import costs, edge, report
from .device import describe_device, memory_bandwidth_gbs

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


_FROM_ENV = object()


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cloud_leg(plan: cloud_api.CloudPlan, images: list[Path], question: str, runs: int, max_tokens: int,
              on_run=None, key=_FROM_ENV, say=None, **ask_options) -> dict:
    """The cloud block of results.json: measured against the plan's callable model when a key is set, else (or
    when the API fails) estimated; costs at every price the plan shows, standard and batch. Never raises for
    anything the server or the key does: the block says what went wrong, in our own words only (CloudError.plain:
    results files keep nothing a server wrote); SAY, if given, gets the line with the server's short message."""
    requested, call, today = plan.requested, plan.call, plan.today
    block = {"provider": requested.id, "requested": requested.lifecycle(today), "notes": list(plan.notes),
             "about": plan.about, "disputes": list(plan.disputes), "measured": False, "records": []}
    try:
        key = cloud_api.read_key((call or requested).key_env) if key is _FROM_ENV else cloud_api.check_key(key)
    except PocketVLMError as e:
        block["error"], key = str(e), None
    pngs = [(p.name, *_png(p)) for p in images]
    text_tokens = round(len(question.split()) * 1.3) + 8  # chat framing; no provider tokenizer offline
    if call is None:
        block["skipped"] = "no callable model in the price data; cloud figures below are estimates"
    elif not key and "error" not in block:
        block["skipped"] = (f"${call.key_env} is not set; cloud figures below are estimates from the price "
                            f"data, not measurements")
    elif key:
        # beside each measured prompt, what the estimate's rule gives for the same request: the API's usage checks
        # the rule (the only check there is where the data marks the model's rule "assumed")
        rule = call.image_rule()
        block["token_rule"] = {"rule": rule.id, "method": rule.describe(), "text_tokens": text_tokens}
        try:
            for name, png, size in pngs:
                image_tokens = cloud_api.estimate_image_tokens(call, *size)
                for run in range(runs):
                    r = cloud_api.ask(call, key, question, [png], max_tokens, **ask_options)
                    cost = (call.cost(r.prompt_tokens, r.completion_tokens)
                            if r.prompt_tokens is not None and r.completion_tokens is not None else None)
                    rec = {"image": name, "run": run, "ttft_s": r.ttft_s, "e2e_s": r.total_s,
                           "output_tok_s": r.output_tok_s, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens, "cost_usd": cost, "attempts": r.attempts,
                           "image_px": list(size), "estimated_image_tokens": image_tokens,
                           "estimated_prompt_tokens": text_tokens + image_tokens}
                    block["records"].append(rec)
                    if on_run:
                        on_run(rec)
            block["measured"] = True
        except cloud_api.CloudError as e:
            advice = ("; pass --cloud-model with a current id"
                      if e.reason in ("invalid_model", "not_found") and not plan.override else "")
            block["error"] = e.plain + advice
            if say:
                say(str(e) + advice)
    points = plan.prices(block["measured"])
    headline = points[0].provider
    block.update(model=headline.model, name=headline.name,
                 price={"input_per_m": headline.input_per_m, "output_per_m": headline.output_per_m,
                        "date": headline.price_date, "source": headline.price_source, "label": points[0].label,
                        "batch_factor": headline.batch_factor})
    with_usage = [r for r in block["records"] if r["prompt_tokens"] is not None and r["completion_tokens"] is not None]

    def estimated_prompt(p: cloud_api.Provider) -> int:
        return int(text_tokens + statistics.median(cloud_api.estimate_image_tokens(p, *size) for _, _, size in pngs))

    block["prices"] = []
    for point in points:
        if with_usage:  # the tokens the API counted, at this price (another model's: its own tokenizer may differ)
            costs = [point.per_query(r["prompt_tokens"], r["completion_tokens"]) for r in with_usage]
            per_query = {k: _median(c[k] for c in costs) for k in ("standard", "batch")}
            basis = (f"tokens measured on {call.model}" if point.provider.model == call.model else
                     f"tokens measured on {call.model}, at {point.provider.model}'s price")
        else:
            per_query = point.per_query(estimated_prompt(point.provider), max_tokens)
            basis = "estimated tokens"
        block["prices"].append({**point.to_json(today), "per_query_usd": per_query, "basis": basis,
                                "per_1k_usd": {k: v * 1000 if v is not None else None for k, v in per_query.items()}})
    if not with_usage:
        rule = headline.image_rule()
        prompt = estimated_prompt(headline)
        block["estimate"] = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                             "cost_usd": headline.cost(prompt, max_tokens),
                             "method": f"image tokens: {rule.describe()}; text ~1.3 tokens/word; output = "
                                       f"{max_tokens} tokens"}
    return block


def bench(artifacts: list[str], *, images_dir: Path | None = None, question: str = DEFAULT_QUESTION, runs: int = 3,
          warmup: int = 1, max_tokens: int = 32, cloud: str | None = "default", cloud_model: str | None = None,
          cloud_base_url: str | None = None, allow_plain_http: bool = False, providers_file: Path | None = None,
          power_w: float | None = None,
          kwh_price: float | None = None, device_cost: float | None = None, amortize_months: int = 24,
          out: Path | None = None, with_plots: bool = True, device_label: str | None = None,
          threads: int | None = None, progress: bool = True, cloud_options: dict | None = None,
          today: dt.date | None = None, image_sizes: list[int] | None = None, force: bool = False) -> dict:
    """Measure every artifact, then the cloud leg (`cloud`: a provider name from the price data, "default" for
    the data's default, None for no cloud leg); `today` (default: the run's date) decides what is retired.
    image_sizes: the image budgets to measure each artifact at (a sweep: one worker per artifact and size, each
    variant id suffixed @size); None: each artifact's own. allow_plain_http: cloud_base_url may be http:// to
    another host (cloud.check_base_url)."""
    from tqdm import tqdm

    if cloud_base_url is not None:  # checked whether or not a cloud leg runs: a flag that cannot work is refused
        cloud_api.check_base_url(cloud_base_url, "--cloud-base-url", allow_plain_http=allow_plain_http)
    if runs < 1 or warmup < 0 or max_tokens < 2:
        raise PocketVLMError("need --runs >= 1, --warmup >= 0 and --max-tokens >= 2 (decode speed needs 2 tokens)")
    for a in artifacts:
        if not Path(a).exists():
            raise PocketVLMError(f"{a}: no such artifact or model folder")
    inputs = [*artifacts, *([images_dir] if images_dir else []), *([providers_file] if providers_file else [])]
    if out:
        report.check_out(out, force=force, inputs=inputs)
    from pocketvlm.prompt import check_image_size

    sizes = [check_image_size(s) for s in image_sizes] if image_sizes else [None]
    plan = (cloud_api.plan_cloud(cloud, path=providers_file, model=cloud_model, base_url=cloud_base_url, today=today,
                                 allow_plain_http=allow_plain_http) if cloud else None)
    # a malformed key is the user's to fix: one line now, not after the edge leg has run for minutes
    key = cloud_api.read_key((plan.call or plan.requested).key_env) if plan else None
    device = describe_device(device_label)
    results = {"schema": report.SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "devices": [device], "variants": [], "records": [], "cloud": [],
               "settings": {"question": question, "runs": runs, "warmup": warmup, "max_tokens": max_tokens,
                            "image_sizes": image_sizes}}
    with tempfile.TemporaryDirectory(prefix="pocketvlm-bench-") as scratch:
        images = bench_images(images_dir, Path(scratch))
        results["settings"]["images"] = [p.name for p in images]
        per_leg = len(images) * runs
        bar = tqdm(total=per_leg * (len(artifacts) * len(sizes) + (1 if plan else 0)), unit="run",
                   disable=not progress, file=sys.stderr)
        for artifact, size in [(a, s) for a in artifacts for s in sizes]:
            bar.set_description(f"edge {Path(artifact).name}" + (f" @{size}px" if size else ""))
            # measured again beside each variant: on a shared machine the bandwidth swings from one minute to the
            # next (25-39 GB/s within one image_budget run on the 2-core EPYC), and the roofline divides by it
            bandwidth = memory_bandwidth_gbs() if device["memory_bandwidth_gbs"] else None
            got = edge.measure(Path(artifact), images=images, question=question, runs=runs, warmup=warmup,
                               max_tokens=max_tokens, threads=threads, image_size=size, on_run=lambda _: bar.update())
            variant = got["variant"]
            variant["device"] = device["id"]
            base = f"{variant.get('backend', 'failed')}-{variant.get('quant', Path(artifact).name)}"
            if image_sizes:
                base += f"@{size}"
            taken = {v["id"] for v in results["variants"]}
            variant["id"] = base if base not in taken else f"{base}-{len(taken)}"
            if variant.get("decode_weight_bytes") and bandwidth:
                variant["memory_bandwidth_gbs"] = round(bandwidth, 2)
                variant["roofline_tok_s"] = bandwidth * 1e9 / variant["decode_weight_bytes"]
            results["variants"].append(variant)
            results["records"] += [{"device": device["id"], "variant": variant["id"], "backend": variant.get("backend"),
                                    "quant": variant.get("quant"), "measured": True, **r} for r in got["runs"]]
            if "error" in variant:
                bar.update(per_leg - len(got["runs"]))
                # bar.write: a line of its own, not glued to the progress bar
                bar.write(f"pocketvlm: {artifact}: {variant['error']}", file=sys.stderr)
        if plan:
            bar.set_description(f"cloud {plan.requested.id}")
            said = []  # the failure as the terminal sees it: with the server's short, scrubbed message
            try:
                block = cloud_leg(plan, images, question, runs, max_tokens, on_run=lambda _: bar.update(), key=key,
                                  say=said.append, allow_plain_http=allow_plain_http, **(cloud_options or {}))
            except Exception as e:  # a bug: keep what the edge leg measured, then fail loudly
                bar.close()
                head = plan.prices(measured=False)[0].provider
                results["cloud"].append({"provider": plan.requested.id, "name": head.name, "model": head.model,
                                         "measured": False, "records": [], "notes": list(plan.notes),
                                         "price": {"input_per_m": head.input_per_m,
                                                   "output_per_m": head.output_per_m, "date": head.price_date,
                                                   "source": head.price_source},
                                         "error": f"internal error ({e.__class__.__name__}); a pocketvlm bug"})
                results["costs"] = cost_table(results, power_w, kwh_price, device_cost, amortize_months)
                if out:
                    report.write(results, Path(out), with_plots=False, force=force, inputs=inputs)
                if cloud_api.Secret(key).leaks("".join(traceback.format_exception(e))):
                    raise RuntimeError(f"the cloud leg failed ({e.__class__.__name__}); its message contained the "
                                       f"API key and is not shown") from None
                raise
            bar.update(per_leg - len(block["records"]))
            for message in (*block["notes"], block.get("skipped"), *(said or [block.get("error")])):
                if message:
                    bar.write(f"pocketvlm: cloud leg: {message}", file=sys.stderr)
            results["cloud"].append(block)
        bar.close()
    agreement(results)
    results["costs"] = cost_table(results, power_w, kwh_price, device_cost, amortize_months)
    if out:
        report.write(results, Path(out), with_plots=with_plots, force=force, inputs=inputs)
    return results


def agreement(results: dict) -> None:
    """Each variant's generated tokens against the reference's at the same image budget (where the reference was
    benched too): the share of positions that agree, over the first run of every image. Set on the variant."""
    def tokens(variant_id):
        return {r["image"]: r["token_ids"] for r in results["records"]
                if r["variant"] == variant_id and r.get("token_ids") is not None}

    refs = {v.get("image_size"): tokens(v["id"]) for v in results["variants"] if v.get("backend") == "reference"}
    for v in results["variants"]:
        ref = refs.get(v.get("image_size"))
        if not ref or "error" in v:
            continue
        same = total = 0
        for image, ids in tokens(v["id"]).items():
            if image in ref:
                same += sum(a == b for a, b in zip(ids, ref[image]))
                total += max(len(ids), len(ref[image]))
        v["agreement"] = same / total if total else None


def cost_table(results: dict, power_w, kwh_price, device_cost, amortize_months) -> dict:
    """Per variant: edge energy per query, and against every cloud price shown (standard and batch) the cloud
    cost per 1k queries and the break-even volume (in queries, and per month over the amortisation period)."""
    prices, measured = [], False
    for c in results["cloud"]:
        if c.get("prices"):
            prices = c["prices"]
            measured = any(r.get("cost_usd") is not None for r in c.get("records", []))
            break
    months = amortize_months or None
    rows = []
    for row in report.summarize(results):
        if row["error"] or not row["e2e_s"]:
            continue
        edge_q = costs.edge_cost_per_query(row["e2e_s"]["median"], power_w, kwh_price)
        per_price = []
        for p in prices:
            entry = {"label": p["label"], "model": p["model"], "name": p["name"], "basis": p.get("basis")}
            for mode in ("standard", "batch"):
                cloud_q = p["per_query_usd"].get(mode)
                even = costs.break_even_queries(device_cost, edge_q, cloud_q) if cloud_q is not None else None
                entry[f"per_1k_{mode}"] = cloud_q * 1000 if cloud_q is not None else None
                entry[f"break_even_{mode}"] = even
                entry[f"break_even_per_month_{mode}"] = even / months if even is not None and months else None
            per_price.append(entry)
        headline = prices[0]["per_query_usd"]["standard"] if prices else None
        rows.append({"device": row["device"], "variant": row["variant"], "edge_per_query": edge_q,
                     "edge_per_1k": edge_q * 1000 if edge_q is not None else None,
                     "cloud_per_query": headline, "cloud_per_1k": headline * 1000 if headline is not None else None,
                     "cloud_cost_measured": measured,
                     "break_even_queries": per_price[0]["break_even_standard"] if per_price else None,
                     "cloud": per_price})
    return {"power_w": power_w, "kwh_price": kwh_price, "device_cost": device_cost,
            "amortize_months": amortize_months, "rows": rows}
