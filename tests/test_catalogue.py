"""Issue 35 item 1, "the catalogue moved again": what the price data says about Mistral's models is what Mistral's own
docs say (pinned here with the commit it was read at), a third party that says otherwise is recorded beside it, the
default baseline is a current model on the run's date, the help names what the data names, and a measured run shows
the API's prompt-token count beside the estimate's rule for the same request (fake Mistral on loopback)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re

import pytest
from cloudfakes import RawServer, mistral
from conftest import REPO, draw_image, run_cli

from pocketvlm.bench_device import providers as providers_data
from pocketvlm.bench_device import report
from pocketvlm.bench_device.bench import cloud_leg
from pocketvlm.bench_device.cloud import plan_cloud
from pocketvlm.errors import PocketVLMError

DATA = json.loads(providers_data.builtin_path().read_text())
MODELS = DATA["models"]
TODAY = dt.date(2026, 12, 8)  # the day issue 35 was worked on; the real run date is checked too
PDP = "mistralai/platform-docs-public"
KEY = "mst-catalogue-0123456789abcdefghijkl"


def _today():
    return dt.datetime.now(dt.timezone.utc).date()


def _sources(src) -> list:
    return src if isinstance(src, list) else [src]


# ------------------------------------------------------------------------------------------------ the baseline

@pytest.mark.parametrize("today", [TODAY, _today()], ids=["2026-12-08", "run-date"])
def test_the_default_provider_is_current_on_the_run_date(today):
    plan = plan_cloud(None, today=today)
    assert plan.requested.status(today) != "retired"
    assert plan.call is not None and plan.call.model == plan.requested.model  # called itself, not a successor
    assert not any("retired" in n for n in plan.notes)
    assert MODELS[plan.requested.model]["docs_stage"] == "General Availability"


@pytest.mark.parametrize("name", ["mistral-medium-3", "mistral-medium-3.1"])
def test_medium_3_and_3_1_are_retired_on_2026_09_01_and_priced_at_their_last_price(name):
    # PDP mistral-medium-3-25-05.ts / mistral-medium-3-1-25-08.ts @222f4ba: retirementDate 2026-08-31, replacement
    # Mistral Medium 3.5, price 0.4 / 2.0 USD per M tokens
    plan = plan_cloud(name, today=dt.date(2026, 9, 1))
    assert plan.requested.status(dt.date(2026, 9, 1)) == "retired" and plan.requested.retired == "2026-08-31"
    assert plan_cloud(name, today=dt.date(2026, 8, 30)).requested.status(dt.date(2026, 8, 30)) == "deprecated"
    assert plan.call.name == "Mistral Medium 3.5" and plan.call.model == "mistral-medium-3-5"
    head = plan.prices(measured=False)[0]
    assert head.provider.model == plan.requested.model and head.label == "retired model, last price"
    assert (head.provider.input_per_m, head.provider.output_per_m) == (0.40, 2.00)


# ------------------------------------------------------------------------------------------------ the rows

def _is_source(s) -> bool:
    if not isinstance(s, dict):
        return False
    if s.get("repo"):  # a file at a commit, and a date: the file's last change, or the date it states
        return bool(s.get("path")) and bool(re.fullmatch(r"[0-9a-f]{40}", s.get("commit", ""))) and \
            bool(s.get("changed") or s.get("stated") or s.get("note"))
    if s.get("url"):
        return bool(s.get("date") or s.get("read"))
    return bool(s.get("note"))


@pytest.mark.parametrize("model_id", sorted(m for m in MODELS if MODELS[m]["endpoint"] == "mistral"))
def test_every_hosted_model_row_has_sources_and_an_as_of_date(model_id):
    m = MODELS[model_id]
    checked = dt.date.fromisoformat(DATA["sources_checked"][PDP]["checked"])
    as_of = dt.date.fromisoformat(m["price"]["as_of"])
    assert as_of <= checked
    for key in ("lifecycle_source",):
        assert all(_is_source(s) for s in _sources(m[key])), key
    assert all(_is_source(s) for s in _sources(m["price"]["source"]))
    assert all(_is_source(s) for s in _sources(m["context"]["source"]))
    assert any(s.get("repo") == PDP for s in _sources(m["lifecycle_source"]))  # the provider's own docs
    assert m["docs_stage"] in ("General Availability", "Public Preview", "Deprecated")
    for old in m["price"].get("history", []):
        assert _is_source(old["source"]) and old["from"] <= old["until"] < m["price"]["as_of"]
    for claim in m.get("third_party", []):
        assert claim["claim"] and claim["docs_say"] and all(_is_source(s) for s in _sources(claim["source"]))
        assert all(_is_source(s) and s.get("repo") == PDP for s in _sources(claim.get("docs_source", [])))


def test_large_4_is_recorded_as_its_docs_give_it():
    # PDP src/schema/models/models/mistral-large-4-0.ts @2175369b: status 'PublicPreview', releaseDate 2026-10-06,
    # apiNames mistral-large-4 / mistral-large-4-0, price 0.68 / 2.09 with originalPrice 1.36 / 4.18; changelog
    # 2026-10-06 @69fa7f5a: "Launch pricing: 50% off for 2 weeks."
    m = MODELS["mistral-large-4"]
    assert m["api_names"] == ["mistral-large-4", "mistral-large-4-0"] and "mistral-large-latest" in m["not_api_names"]
    assert (m["docs_stage"], m["released"], m["deprecated"], m["retired"]) == ("Public Preview", "2026-10-06", None,
                                                                                None)
    assert (m["price"]["input_per_m"], m["price"]["output_per_m"]) == (1.36, 4.18)
    launch = m["price"]["history"][0]
    assert (launch["input_per_m"], launch["output_per_m"]) == (0.68, 2.09)  # half the list price
    assert (launch["from"], launch["until"]) == ("2026-10-06", "2026-10-19")  # 2 weeks
    assert m["price"]["as_of"] == "2026-10-20"
    assert {s["commit"] for s in _sources(m["price"]["source"])} == {"2175369b7a173014c6847fe16cb916b39646bf4d",
                                                                    "69fa7f5a0c0eda8afc463bce8bbe22fd3af23ecf"}
    plan = plan_cloud("mistral-large-4", today=TODAY)
    head = plan.prices(measured=True)[0]
    assert plan.call.model == "mistral-large-4" and head.label == "current price"
    assert (head.provider.input_per_m, head.provider.output_per_m) == (1.36, 4.18)
    assert plan_cloud("mistral-large-4-0", today=TODAY).requested.model == "mistral-large-4"  # the provider alias
    assert plan.requested.lifecycle(TODAY)["docs_stage"] == "Public Preview"


def test_medium_3_5_follows_the_docs_and_says_a_third_party_disagrees():
    m = MODELS["mistral-medium-3-5"]
    # the docs (PDP mistral-medium-3-5-26-04.ts @222f4ba, changed 2026-08-11): GA, metadata {} -- so no dates here
    assert (m["deprecated"], m["retired"], m["successor"]) == (None, None, None)
    claim = next(c for c in m["third_party"] if "deprecated" in c["claim"])
    assert "2026-12-14" in claim["claim"] and "openrouter.ai" in claim["source"]["url"]
    assert "no deprecation" in claim["docs_say"]
    plan = plan_cloud(None, today=TODAY)
    assert plan.requested.status(dt.date(2026, 12, 15)) == "active"  # the third party's date changes nothing
    said = [d for d in plan.disputes if "openrouter.ai" in d]
    assert len(said) == 1 and "2026-12-14" in said[0] and "no deprecation" in said[0]
    # and Large 4's price: the third party's $0.70 / $2.10 is recorded, the docs' price is the one used
    large = plan_cloud("mistral-large-4", today=TODAY)
    assert any("$0.70" in d and "$1.36" in d for d in large.disputes)
    assert large.call.input_per_m == 1.36


def test_a_third_party_claim_without_the_docs_side_is_refused(tmp_path):
    data = json.loads(providers_data.builtin_path().read_text())
    del data["models"]["mistral-medium-3-5"]["third_party"][0]["docs_say"]
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PocketVLMError, match=r"models\.mistral-medium-3-5\.third_party\[0\]\.docs_say is missing"):
        plan_cloud(None, path=path)


# ------------------------------------------------------------------------------------------------ help and README

def test_the_cloud_help_names_the_data_s_models_as_of_the_date():
    now = providers_data.cloud_help(today=TODAY)
    assert now.index("mistral-medium-3.5 (default: Mistral Medium 3.5, General Availability)") < \
        now.index("mistral-large-4")
    assert "mistral-large-4 (Mistral Large 4, Public Preview)" in now
    assert "mistral-medium-3 (Mistral Medium 3, retired 2026-08-31: estimated at its last price, measured on " \
           "Mistral Medium 3.5)" in now
    before = providers_data.cloud_help(today=dt.date(2026, 8, 1))
    assert "deprecated since 2026-05-22, retires 2026-08-31" in before and "retired 2026" not in before
    for name in DATA["providers"]:
        assert name in now


def test_bench_help_and_readme_name_the_current_models():
    proc = run_cli("bench", "run", "--help", env={"COLUMNS": "2000"})  # one line per option: no wrapping
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("--cloud CLOUD"))
    assert "mistral-medium-3.5 (default: Mistral Medium 3.5, General Availability)" in line
    assert "mistral-large-4 (Mistral Large 4, Public Preview)" in line
    readme = (REPO / "README.md").read_text()
    assert "Mistral Medium 3.5" in readme and "--cloud mistral-large-4" in readme


# ------------------------------------------------------------------------------------------------ measured vs rule

def _by_rule(w: int, h: int, patch: int, merge: int, max_side: int) -> int:
    """mistral-common's ImageEncoder count, written out again here apart from the code under test."""
    ratio = max(w / max_side, h / max_side)
    if ratio > 1:
        w, h = max(1, round(w / ratio)), max(1, round(h / ratio))
    cols, rows = (w - 1) // (patch * merge) + 1, (h - 1) // (patch * merge) + 1
    return (cols + 1) * rows


def _image_size(body: dict) -> tuple[int, int]:
    from PIL import Image

    url = body["messages"][0]["content"][0]["image_url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(640, 480), (1600, 900)]):
        path = tmp_path / f"img{i}.png"
        draw_image(w, h, seed=i).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("api_rule", ["same", "pixtral"])
def test_a_measured_run_shows_usage_beside_the_rules_estimate(images, tmp_path, api_rule):
    rule = DATA["image_token_rules"][MODELS["mistral-large-4"]["image_tokens"]["rule"]]
    other = DATA["image_token_rules"]["pixtral-16px"]
    used = rule if api_rule == "same" else other

    def count(body):  # the fake API's own tokenizer: 12 text tokens plus the image by USED's rule
        return 12 + _by_rule(*_image_size(body), used["patch"], used.get("merge", 1), used["max_side"])

    server = RawServer(mistral(KEY, {"mistral-large-4"}, prompt_tokens=count, completion_tokens=5))
    try:
        plan = plan_cloud("mistral-large-4", base_url=server.url, today=TODAY)
        block = cloud_leg(plan, images, "Describe this image.", 2, 5, key=KEY)
    finally:
        server.close()
    assert block["measured"] and len(block["records"]) == 4
    assert block["token_rule"]["rule"] == MODELS["mistral-large-4"]["image_tokens"]["rule"]
    text = block["token_rule"]["text_tokens"]
    for r in block["records"]:
        w, h = r["image_px"]
        expected = _by_rule(w, h, rule["patch"], rule.get("merge", 1), rule["max_side"])
        assert r["estimated_image_tokens"] == expected
        assert r["estimated_prompt_tokens"] == text + expected
        assert r["prompt_tokens"] == 12 + _by_rule(w, h, used["patch"], used.get("merge", 1), used["max_side"])
    assert {tuple(r["image_px"]) for r in block["records"]} == {(640, 480), (1600, 900)}
    if api_rule == "pixtral":  # a rule that is wrong for the model shows as a gap in every row
        assert all(r["prompt_tokens"] != r["estimated_prompt_tokens"] for r in block["records"])

    results = {"schema": report.SCHEMA, "devices": [], "variants": [], "records": [], "cloud": [block],
               "settings": {"question": "Describe this image.", "images": [p.name for p in images], "runs": 2}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    merged = report.load([path])  # RESULTS_SHAPE takes the new fields
    md = report.markdown(merged)
    assert "Prompt tokens, measured (the API's usage.prompt_tokens) against the estimate's rule" in md
    for r in block["records"][::2]:
        w, h = r["image_px"]
        gap = r["prompt_tokens"] - r["estimated_prompt_tokens"]
        row = f"| {r['image']} | {w}x{h} | {r['prompt_tokens']} | {r['estimated_prompt_tokens']} " \
              f"({r['estimated_image_tokens']} + text) | {gap:+d} |"
        assert row in md, md
    assert "third party vs the provider's docs" in md and "$0.70" in md
    assert "Mistral Large 4** (`mistral-large-4`, Public Preview;" in md


def test_a_results_file_with_a_mistyped_estimate_is_refused(tmp_path):
    bad = {"schema": report.SCHEMA, "cloud": [{"records": [{"prompt_tokens": 10, "estimated_prompt_tokens": "ten"}]}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PocketVLMError, match=r"cloud\[0\]\.records\[0\]\.estimated_prompt_tokens"):
        report.load([path])
