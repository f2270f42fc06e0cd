"""results.json (the schema), report.md and the plots; and merging results recorded on several devices.

results.json, schema "pocketvlm.bench/2" ("pocketvlm.bench/1" files, without the cloud lifecycle and price list,
are still read and merged):
  schema, created
  devices:  [{id, cpu, cores, ram_bytes, os, machine, accelerator, engines{}, memory_bandwidth_gbs}]
  settings: {question, images[], runs, warmup, max_tokens}
  variants: [{id, device, artifact, backend, quant, size_bytes, load_s, peak_rss_bytes, decode_weight_bytes,
              memory_bandwidth_gbs, roofline_tok_s, describe{}, error?}]   one per artifact per device;
            memory_bandwidth_gbs: measured just before the variant ran (the roofline's divisor; absent in older
            files, whose roofline used the device's one figure)
  records:  [{device, variant, backend, quant, image, run, encode_s, ttft_s, prefill_tok_s, decode_tok_s, e2e_s,
              prompt_tokens, generated_tokens, measured: true}]      one per variant x image x run
  cloud:    [{provider, name, model, measured, skipped?, error?, notes[], about?, disputes[]?,
              requested{model, name, status, as_of, docs_stage?, released, deprecated, retired, successor, source},
              price{input_per_m, output_per_m, date, source, label, batch_factor},        the headline price
              prices[{label, model, name, status, retired, input_per_m, output_per_m, batch_factor, date, source,
                      batch_source, basis, per_query_usd{standard, batch}, per_1k_usd{standard, batch}}],
              records[{image, run, ttft_s, e2e_s, output_tok_s, prompt_tokens, completion_tokens, cost_usd,
                       attempts, image_px[w, h]?, estimated_image_tokens?, estimated_prompt_tokens?}],
              token_rule{rule, method, text_tokens}?,
              estimate{prompt_tokens, completion_tokens, cost_usd, method}?}]
            model/name: the model measured, or (not measured) the one whose price heads the estimate; prices[0] is
            that price; requested: the model the user named, with its lifecycle on the run's date; disputes: where a
            third party disagrees with the provider's docs (the price data follows the docs); a measured record's
            estimated_*: what the estimate's token_rule gives for the same request, beside the API's prompt_tokens
  costs:    {power_w, kwh_price, device_cost, amortize_months, rows[{variant, device, edge_per_query,
              edge_per_1k, cloud_per_query, cloud_per_1k, cloud_cost_measured, break_even_queries,
              cloud[{label, model, name, basis, per_1k_standard, per_1k_batch, break_even_standard,
                     break_even_batch, break_even_per_month_standard, break_even_per_month_batch}]}]}
Devices that cannot run Python can produce the same file (only the fields they have) and join via `bench report`.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from pocketvlm.artifact import base_tools
from pocketvlm.errors import PocketVLMError
from pocketvlm.jsonfile import dumps
from pocketvlm.manifest import atomic_output, check_output, write_manifest

SCHEMA = "pocketvlm.bench/2"
READS = ("pocketvlm.bench/1", SCHEMA)
METRICS = ("encode_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "e2e_s")


def stats(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(results: dict) -> list[dict]:
    """Per variant: median/min/max of every metric over its records."""
    rows = []
    for v in results["variants"]:
        recs = [r for r in results["records"] if r["variant"] == v["id"] and r["device"] == v["device"]]
        row = {"variant": v["id"], "device": v["device"], "backend": v.get("backend"), "quant": v.get("quant"),
               "size_bytes": v.get("size_bytes"),
               # what a user waits before the first question: the manifest's integrity check (sha256 of every
               # byte, docs/BENCH.md "Opening an artifact") and the engine's own load
               "load_s": v.get("open_s", v.get("load_s")), "engine_load_s": v.get("load_s"),
               "peak_rss_bytes": v.get("peak_rss_bytes"), "roofline_tok_s": v.get("roofline_tok_s"),
               "error": v.get("error"), "note": (v.get("describe") or {}).get("note"),
               "image_size": v.get("image_size"), "agreement": v.get("agreement"),
               "base": v["id"].split("@")[0]}
        for m in METRICS + ("prompt_tokens", "image_tiles"):
            row[m] = stats(r.get(m) for r in recs)
        if row["decode_tok_s"] and row["roofline_tok_s"]:
            row["roofline_fraction"] = row["decode_tok_s"]["median"] / row["roofline_tok_s"]
        rows.append(row)
    return rows


# The shape of a results file as `bench report` reads it (files come from other devices and other tools, so every
# field the report uses is checked before it is used): a type, a tuple of types, [shape] for a list of it, or
# {key: shape} for an object ("key?" optional; keys not named are kept unread). Numbers are finite.
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_STAT_FIELDS = {m + "?": _OPT_NUM for m in METRICS + ("prompt_tokens", "image_tiles")}
RESULTS_SHAPE = {
    "schema": str,
    "created?": _OPT_STR,
    "settings?": {"question?": _OPT_STR, "images?": [str], "runs?": _OPT_NUM, "warmup?": _OPT_NUM,
                  "max_tokens?": _OPT_NUM, "image_sizes?": ([int], type(None))},
    "devices?": [{"id": str, "cpu?": _OPT_STR, "cores?": _OPT_NUM, "ram_bytes?": _OPT_NUM, "os?": _OPT_STR,
                  "accelerator?": _OPT_STR, "memory_bandwidth_gbs?": _OPT_NUM}],
    "variants?": [{"id": str, "device": str, "backend?": _OPT_STR, "quant?": _OPT_STR, "size_bytes?": _OPT_NUM,
                   "load_s?": _OPT_NUM, "open_s?": _OPT_NUM, "peak_rss_bytes?": _OPT_NUM,
                   "roofline_tok_s?": _OPT_NUM, "error?": _OPT_STR, "describe?": ({"note?": _OPT_STR}, type(None)),
                   "image_size?": _OPT_NUM, "agreement?": _OPT_NUM}],
    "records?": [{"variant": str, "device": str, **_STAT_FIELDS}],
    "cloud?": [{"name?": _OPT_STR, "model?": _OPT_STR, "notes?": [str], "error?": _OPT_STR, "skipped?": _OPT_STR,
                "about?": _OPT_STR,
                "price?": ({"input_per_m?": _OPT_NUM, "output_per_m?": _OPT_NUM, "date?": _OPT_STR,
                            "source?": _OPT_STR}, type(None)),
                "disputes?": [str],
                "requested?": ({"model?": _OPT_STR, "status?": _OPT_STR, "docs_stage?": _OPT_STR}, type(None)),
                "records?": [{"ttft_s?": _OPT_NUM, "e2e_s?": _OPT_NUM, "output_tok_s?": _OPT_NUM,
                              "cost_usd?": _OPT_NUM, "prompt_tokens?": _OPT_NUM, "image_px?": ([int], type(None)),
                              "estimated_image_tokens?": _OPT_NUM, "estimated_prompt_tokens?": _OPT_NUM}],
                "token_rule?": ({"rule?": _OPT_STR, "method?": _OPT_STR, "text_tokens?": _OPT_NUM}, type(None)),
                "estimate?": ({"prompt_tokens": _NUM, "completion_tokens": _NUM, "cost_usd": _NUM, "method": str},
                              type(None)),
                "prices?": [{"name": str, "model": str, "label": str, "input_per_m": _NUM, "output_per_m": _NUM,
                             "date?": _OPT_STR, "source?": _OPT_STR, "basis?": _OPT_STR,
                             "batch_factor?": _OPT_NUM, "batch_source?": _OPT_STR,
                             "per_1k_usd": {"standard": _OPT_NUM, "batch?": _OPT_NUM}}]}],
    "costs?": {"power_w?": _OPT_NUM, "kwh_price?": _OPT_NUM, "device_cost?": _OPT_NUM,
               "amortize_months?": _OPT_NUM,
               "rows?": [{"device": str, "variant": str, "edge_per_1k?": _OPT_NUM, "cloud_per_1k?": _OPT_NUM,
                          "edge_per_query?": _OPT_NUM, "cloud_per_query?": _OPT_NUM,
                          "cloud_cost_measured?": bool, "break_even_queries?": _OPT_NUM,
                          "cloud?": [{"label?": _OPT_STR, "name?": _OPT_STR, "model?": _OPT_STR,
                                      "per_1k_standard?": _OPT_NUM, "per_1k_batch?": _OPT_NUM,
                                      "break_even_standard?": _OPT_NUM, "break_even_batch?": _OPT_NUM,
                                      "break_even_per_month_standard?": _OPT_NUM,
                                      "break_even_per_month_batch?": _OPT_NUM}]}]},
}


def shape_problem(value, shape, where: str = "") -> str | None:
    """Where VALUE departs from SHAPE (see RESULTS_SHAPE), or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'} is {type(value).__name__}, not an object"
        for key, inner in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if not key.endswith("?"):
                    return f"{where}.{name} is missing".lstrip(".")
                continue
            problem = shape_problem(value[name], inner, f"{where}.{name}".lstrip("."))
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, not a list"
        return next((p for i, v in enumerate(value) if (p := shape_problem(v, shape[0], f"{where}[{i}]"))), None)
    options = shape if isinstance(shape, tuple) else (shape,)
    for option in options:
        if isinstance(option, (dict, list)):
            if shape_problem(value, option, where) is None:
                return None
        elif isinstance(value, option) and not (isinstance(value, bool) and option is not bool):
            return None
    return f"{where} is {json.dumps(value)[:40] if isinstance(value, (str, int, float)) else type(value).__name__}" \
           f", not {' or '.join(o.__name__ if isinstance(o, type) else type(o).__name__ for o in options)}"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load(paths: list[Path]) -> dict:
    """Read and merge results files (devices, variants, records and cloud legs concatenated). Each file is checked
    against RESULTS_SHAPE first: a malformed file is one line naming the field, before anything is written."""
    merged = {"schema": SCHEMA, "devices": [], "variants": [], "records": [], "cloud": [], "settings": {},
              "costs": {"rows": []}}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(), parse_constant=_refuse_constant)
        except FileNotFoundError as e:
            raise PocketVLMError(f"{path}: no such results file") from e
        except IsADirectoryError as e:
            raise PocketVLMError(f"{path}: a folder, not a results file (give FOLDER/results.json)") from e
        except (OSError, ValueError, RecursionError) as e:
            why = str(e) if "JSON allows" in str(e) else e.__class__.__name__
            raise PocketVLMError(f"{path}: unreadable results file ({why})") from e
        if not isinstance(data, dict) or data.get("schema") not in READS:
            raise PocketVLMError(f"{path}: not a pocketvlm bench results file (schema {SCHEMA})")
        problem = shape_problem(data, RESULTS_SHAPE)
        if problem:
            raise PocketVLMError(f"{path}: malformed results file: {problem}")
        seen = {d["id"] for d in merged["devices"]}
        merged["devices"] += [d for d in data.get("devices", []) if d.get("id") not in seen]
        for key in ("variants", "records", "cloud"):
            merged[key] += data.get(key, [])
        merged["costs"]["rows"] += data.get("costs", {}).get("rows", [])
        merged["settings"] = merged["settings"] or data.get("settings", {})
        merged["created"] = data.get("created")
    return merged


def md(text) -> str:
    """TEXT as one Markdown table cell or line that shows as written: no table break (|), no new line, no HTML,
    link, image, heading, emphasis or code span (each such character backslash-escaped), no control characters.
    Model ids keep their - and _ unescaped: inside a line they format nothing."""
    text = "".join(" " if (ord(c) < 32 or 127 <= ord(c) < 160) else c for c in str(text))
    return re.sub(r"([\\`*|<>\[\]#!])", r"\\\1", text)


def _code(text) -> str:
    """TEXT as a code span, or as escaped text where a code span cannot hold it (a backtick or | inside)."""
    text = str(text)
    return md(text) if re.search(r"[`|\x00-\x1f\x7f-\x9f]", text) else f"`{text}`"


def _fmt(value, spec=".2f", unit=""):
    return "–" if value is None else f"{value:{spec}}{unit}"


def _stat(s, spec=".2f"):
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:{spec}}"
    return f"{s['median']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def _mb(b):
    return "–" if b is None else f"{b / 1e6:.1f} MB"


def markdown(results: dict) -> str:
    rows = summarize(results)
    s = results.get("settings", {})
    lines = ["# pocketvlm bench", ""]
    lines += [f"Question: “{md(s.get('question') or '')}” · images: {md(', '.join(s.get('images', [])))} · "
              f"{s.get('runs')} runs after {s.get('warmup')} warm-up · {s.get('max_tokens')} generated tokens per run "
              f"(end of sequence ignored). Cells: median (min–max).", ""]
    lines += ["## Devices", "", "| id | CPU | cores | RAM | OS | accelerator | memory bandwidth |",
              "|---|---|---|---|---|---|---|"]
    for d in results["devices"]:
        lines.append(f"| {md(d['id'])} | {md(d.get('cpu') or '–')} | {_fmt(d.get('cores'), 'g')} | "
                     f"{_fmt((d.get('ram_bytes') or 0) / 2**30 or None, '.0f', ' GiB')} | {md(d.get('os') or '–')} | "
                     f"{md(d.get('accelerator') or '–')} | {_fmt(d.get('memory_bandwidth_gbs'), '.1f', ' GB/s')} |")
    lines += ["", "## Edge (measured)", "",
              "| device | variant | size | load s | encode s | TTFT s | prefill tok/s | decode tok/s | "
              "of roofline | e2e s | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = set()
    for r in rows:
        if r["error"]:
            lines.append(f"| {md(r['device'])} | {md(r['variant'])} | failed: {md(r['error'])} |||||||||")
            continue
        frac = _fmt(r.get("roofline_fraction", None) and 100 * r["roofline_fraction"], ".1f", "%")
        lines.append(f"| {md(r['device'])} | {md(r['variant'])} | {_mb(r['size_bytes'])} | {_fmt(r['load_s'])} | "
                     f"{_stat(r['encode_s'])} | {_stat(r['ttft_s'])} | {_stat(r['prefill_tok_s'], '.0f')} | "
                     f"{_stat(r['decode_tok_s'], '.1f')} | {frac} | {_stat(r['e2e_s'])} | {_mb(r['peak_rss_bytes'])} |")
        if r["note"]:
            notes.add(f"{md(r['variant'])}: {md(r['note'])}")
    lines += ["", "Load s: from open to ready, including the check of every file's sha256 against the manifest "
              "(POCKETVLM_VERIFY=sizes skips the hashing and does not notice changed bytes). "
              "Roofline: decode tok/s ÷ (memory bandwidth ÷ weight bytes read per token) — the physical ceiling "
              "of decode on this device."]
    lines += [f"- {n}" for n in sorted(notes)]
    if s.get("image_sizes"):
        lines += ["", "## Image budget (--image-size)", "",
                  "The longest edge images are resized to before tiling: fewer tiles, fewer prompt tokens, a "
                  "shorter time to first token. Agreement: the share of generated tokens equal to the reference's "
                  "at the same budget.", "",
                  "| device | variant | image size | tiles | prompt tokens | TTFT s | peak RSS | agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if not r["error"]), key=lambda r: (r["base"], r["image_size"] or 0)):
            agree = _fmt(r["agreement"] if r["agreement"] is None else 100 * r["agreement"], ".1f", "%")
            lines.append(f"| {md(r['device'])} | {md(r['base'])} | {_fmt(r['image_size'], 'g', ' px')} | "
                         f"{_stat(r['image_tiles'], '.0f')} | {_stat(r['prompt_tokens'], '.0f')} | "
                         f"{_stat(r['ttft_s'])} | {_mb(r['peak_rss_bytes'])} | {agree} |")
    lines += ["", "## Cloud", ""]
    if not results["cloud"]:
        lines.append("No cloud leg in this run.")
    for c in results["cloud"]:
        lines += _cloud_lines(c)
    lines += _cost_lines(results.get("costs", {}))
    return "\n".join(lines) + "\n"


def _money(value, spec=".4f"):
    return "–" if value is None else f"${value:{spec}}"


def _cloud_lines(c: dict) -> list[str]:
    price = c.get("price") or {}
    req = c.get("requested") or {}
    same = req.get("model") == c.get("model")
    status = req.get("status") if same else None
    if same and status == "active" and req.get("docs_stage"):
        status = req["docs_stage"]  # the stage its docs give: a Public Preview allows silent updates
    lines = [f"**{md(c.get('name'))}** ({_code(c.get('model'))}"
             f"{f', {md(status)}' if status and status != 'active' else ''}; "
             f"{_money(price.get('input_per_m'), '.2f')} in / {_money(price.get('output_per_m'), '.2f')} out per M "
             f"tokens, as of {md(price.get('date') or 'unknown')}, {md(price.get('source'))})"]
    lines += [f"- {md(note)}" for note in c.get("notes", [])]
    if c.get("error"):
        lines.append(f"- request failed: {md(c['error'])}")
    if c.get("skipped"):
        lines.append(f"- not measured: {md(c['skipped'])}")
    if c.get("records"):
        recs = c["records"]
        lines.append(f"- measured: TTFT {_stat(stats(r.get('ttft_s') for r in recs))} s, total "
                     f"{_stat(stats(r.get('e2e_s') for r in recs))} s, output "
                     f"{_stat(stats(r.get('output_tok_s') for r in recs), '.1f')} tok/s, cost/query "
                     f"${_stat(stats(r.get('cost_usd') for r in recs), '.6f')}")
    lines += [f"- third party vs the provider's docs (the price data follows the docs): {md(d)}"
              for d in c.get("disputes", [])]
    lines += _rule_check_lines(c)
    if c.get("estimate"):
        e = c["estimate"]
        lines.append(f"- **estimated** (no measurement): ~{e['prompt_tokens']} input + {e['completion_tokens']} "
                     f"output tokens → ${e['cost_usd']:.6f} per query ({md(e['method'])})")
    if c.get("prices"):
        lines += ["", "| price | in / out per M | as of | $/1k queries | $/1k batch | tokens | source |",
                  "|---|---|---|---|---|---|---|"]
        for p in c["prices"]:
            batch = (f"{_money(p['per_1k_usd'].get('batch'))} ({100 * (1 - p['batch_factor']):.0f}% off)"
                     if p.get("batch_factor") is not None else "no batch price")
            lines.append(f"| {md(p['name'])} ({_code(p['model'])}), {md(p['label'])} | ${p['input_per_m']:.2f} / "
                         f"${p['output_per_m']:.2f} | {md(p.get('date') or '–')} | "
                         f"{_money(p['per_1k_usd']['standard'])} | {batch} | {md(p.get('basis') or '–')} | "
                         f"{md(p.get('source'))} |")
        sources = sorted({p["batch_source"] for p in c["prices"] if p.get("batch_source")})
        lines += [f"\nBatch: the provider's batch API (asynchronous: no latency figure applies); {md(s)}."
                  for s in sources]
    if c.get("about"):
        lines.append(f"\nNote: {md(c['about'])}.")
    lines.append("")
    return lines


def _rule_check_lines(c: dict) -> list[str]:
    """Measured prompt tokens (the API's usage) beside what the estimate's image-token rule gives for the same
    request, per image: where they part, the rule (or its text allowance) is wrong for this model."""
    recs = [r for r in c.get("records", []) if r.get("estimated_prompt_tokens") is not None]
    if not recs:
        return []
    rule = c.get("token_rule") or {}
    lines = ["", f"Prompt tokens, measured (the API's usage.prompt_tokens) against the estimate's rule "
                 f"{_code(rule.get('rule') or '–')} for the same request ({md(rule.get('method') or 'rule unknown')}; "
                 f"text ~{_fmt(rule.get('text_tokens'), '.0f')} tokens):", "",
             "| image | px | measured | rule's estimate (image + text) | measured − estimate |",
             "|---|---|---|---|---|"]
    for image in dict.fromkeys(r.get("image") for r in recs):
        mine = [r for r in recs if r.get("image") == image]
        measured, estimated = stats(r.get("prompt_tokens") for r in mine), stats(r["estimated_prompt_tokens"]
                                                                                  for r in mine)
        images = stats(r.get("estimated_image_tokens") for r in mine)
        px = mine[0].get("image_px") or []
        gap = measured["median"] - estimated["median"] if measured else None
        lines.append(f"| {md(image)} | {'x'.join(str(v) for v in px) or '–'} | {_stat(measured, '.0f')} | "
                     f"{_stat(estimated, '.0f')} ({_stat(images, '.0f')} + text) | {_fmt(gap, '+.0f')} |")
    return lines + [""]


def _cost_lines(costs: dict) -> list[str]:
    if not costs.get("rows"):
        return []
    months = costs.get("amortize_months")
    lines = ["## Cost", "",
             f"Edge energy: {_fmt(costs.get('power_w'), '.1f', ' W')} at "
             f"{_fmt(costs.get('kwh_price'), '.3f', ' $/kWh')}; device cost "
             f"{_fmt(costs.get('device_cost'), '.0f', ' $')} over {months} months. Break-even: queries after which "
             f"the device has paid for itself against the cloud price (and that volume per month over "
             f"{months} months); – when the device cost is not given or the edge never gets cheaper.", "",
             "| device | variant | edge $/1k queries | cloud price | cloud $/1k queries | cloud $/1k batch "
             "| cloud figure | break-even (queries) | break-even, batch |",
             "|---|---|---|---|---|---|---|---|---|"]

    def even(total, per_month):
        return "–" if total is None else f"{total:,.0f}" + (f" ({per_month:,.0f}/month)" if per_month else "")

    for r in costs["rows"]:
        figure = "measured" if r.get("cloud_cost_measured") else "estimated"
        per_price = r.get("cloud") or [{"label": "", "name": "cloud", "model": "",
                                        "per_1k_standard": r.get("cloud_per_1k"), "per_1k_batch": None,
                                        "break_even_standard": r.get("break_even_queries")}]
        for p in per_price:
            name = f"{md(p.get('name'))} ({_code(p['model'])}), {md(p.get('label'))}" if p.get("model") else "cloud"
            lines.append(f"| {md(r['device'])} | {md(r['variant'])} | {_fmt(r.get('edge_per_1k'), '.4f')} | {name} | "
                         f"{_fmt(p.get('per_1k_standard'), '.4f')} | {_fmt(p.get('per_1k_batch'), '.4f')} | {figure} | "
                         f"{even(p.get('break_even_standard'), p.get('break_even_per_month_standard'))} | "
                         f"{even(p.get('break_even_batch'), p.get('break_even_per_month_batch'))} |")
    lines.append("")
    return lines


def plots(results: dict, out: Path) -> list[Path]:
    """TTFT and decode speed per variant (cloud as a reference line), and cost against monthly volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .costs import monthly_costs

    rows = [r for r in summarize(results) if not r["error"] and r["ttft_s"]]
    labels = [f"{r['variant']}\n{r['device']}" if len(results["devices"]) > 1 else r["variant"] for r in rows]
    cloud = [c for c in results["cloud"] if c.get("records")]
    written = []
    for metric, title, unit, cloud_key in (("ttft_s", "Time to first token", "s", "ttft_s"),
                                           ("decode_tok_s", "Decode speed", "tokens/s", "output_tok_s")):
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
        med = [r[metric]["median"] if r[metric] else 0 for r in rows]
        err = [[m - r[metric]["min"] if r[metric] else 0 for m, r in zip(med, rows)],
               [r[metric]["max"] - m if r[metric] else 0 for m, r in zip(med, rows)]]
        ax.bar(range(len(rows)), med, yerr=err, color="#4c72b0", capsize=4)
        for c in cloud:
            value = stats(r.get(cloud_key) for r in c["records"])
            if value:
                ax.axhline(value["median"], color="#c44e52", linestyle="--", label=f"{c['name']} (measured)")
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (median, min–max)")
        if cloud:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric.replace('_s', '').replace('_tok', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if results.get("settings", {}).get("image_sizes"):
        written.append(_budget_plot(rows, out, plt))
    costs = results.get("costs", {})
    cost_rows = [r for r in costs.get("rows", []) if r.get("cloud_per_query") is not None]
    if cost_rows:
        volumes = [10 ** (k / 4) for k in range(8, 29)]  # 100 .. 10M queries a month
        fig, ax = plt.subplots(figsize=(6, 4))
        first = cost_rows[0]
        curve = monthly_costs(volumes, first["cloud_per_query"], None, None, 1)
        label = "cloud" + ("" if first["cloud_cost_measured"] else " (estimated)")
        ax.plot(volumes, curve["cloud"], color="#c44e52", label=label)
        for r in cost_rows:
            curve = monthly_costs(volumes, r["cloud_per_query"], r["edge_per_query"], costs.get("device_cost"),
                                  costs.get("amortize_months") or 24)
            if any(curve["edge"]):  # without a power figure or a device cost, edge cost is unknown, not zero
                ax.plot(volumes, curve["edge"], label=f"edge {r['variant']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("queries per month")
        ax.set_ylabel("USD per month")
        ax.set_title("Cost against monthly volume")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "cost_vs_volume.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _budget_plot(rows: list[dict], out: Path, plt) -> Path:
    """TTFT and peak RSS against the image budget, one line per variant: the trade-off --image-size makes."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for base in sorted({r["base"] for r in rows}):
        mine = sorted((r for r in rows if r["base"] == base and r["image_size"]), key=lambda r: r["image_size"])
        sizes = [r["image_size"] for r in mine]
        ax.plot(sizes, [r["ttft_s"]["median"] for r in mine], marker="o", label=base)
        bx.plot(sizes, [(r["peak_rss_bytes"] or 0) / 1e9 for r in mine], marker="o", label=base)
    for axis, what in ((ax, "time to first token, s"), (bx, "peak RSS, GB")):
        axis.set_xlabel("--image-size, px (longest edge before tiling)")
        axis.set_ylabel(what)
        axis.legend(fontsize=7)
    ax.set_title("Image budget: time to first token")
    bx.set_title("Image budget: peak memory")
    fig.tight_layout()
    path = out / "image_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_out(out: Path, *, force: bool, inputs=()) -> None:
    """Before any work: OUT follows the rule every output follows (pocketvlm.manifest.check_output): new, empty,
    or with --force an earlier pocketvlm output; never an input (a results file, an artifact, the images), a
    folder holding one, or the working directory."""
    check_output(Path(out), force=force, protect=tuple(Path(p) for p in inputs))


def write(results: dict, out: Path, *, with_plots: bool = True, force: bool = False, inputs=()) -> list[Path]:
    """The bench's results.json, report.md and plots into OUT (see write_folder)."""
    return write_folder(out, results, markdown(results), (lambda folder: plots(results, folder)) if with_plots
                        else None, force=force, inputs=inputs)


def write_folder(out: Path, results: dict, report_md: str, plot=None, *, force: bool = False, inputs=()) -> list[Path]:
    """results.json, report.md and PLOT(folder)'s images into OUT, as every output is written: built beside OUT,
    a manifest last, renamed into place (so a later --force knows it as ours, and a crash leaves nothing
    half-written). No NaN or Infinity reaches results.json (JSON has neither). Returns the paths as they are in
    OUT."""
    out = Path(out)
    with atomic_output(out, force=force, protect=tuple(Path(p) for p in inputs)) as scratch:
        (scratch / "results.json").write_text(dumps(results) + "\n")
        (scratch / "report.md").write_text(report_md)
        names = ["results.json", "report.md"]
        if plot is not None:
            try:
                made = plot(scratch)
                names += [p.name for p in (made if isinstance(made, list) else [made]) if p is not None]
            except ModuleNotFoundError:
                import sys

                print("pocketvlm: note: matplotlib is not installed, no plots (pip install 'pocketvlm[bench]')",
                      file=sys.stderr)
        write_manifest(scratch, format="report", quant="none",
                       source={"id": str(results.get("schema")), "revision": None}, tools=base_tools())
    return [out / name for name in names]
