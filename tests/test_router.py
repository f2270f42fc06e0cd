"""The router (issue 18): answer on the device, escalate only unsure answers. For real on this machine: the "cloud"
is `pocketvlm serve` on the full micro model on loopback, the edge the weak micro model (samples/micro-weak, the same
recipe stopped at a fifth of its steps)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from cloudfakes import RawServer, mistral
from conftest import SAMPLES, assert_user_error, run_cli

from pocketvlm.router import STATISTICS, answer_probs, check_min_confidence, confidence

MICRO, WEAK = SAMPLES / "micro", SAMPLES / "micro-weak"
HELDOUT = SAMPLES / "heldout" / "questions.json"
KEY = "sk-router-test-7"


# ------------------------------------------------------------------------------------------ confidence

def test_confidence_reads_the_answer_up_to_its_end():
    eos = {9}
    assert answer_probs([1, 2, 9, 4], [0.9, 0.6, 0.8, 0.01], eos) == [0.9, 0.6, 0.8]  # the end counts, not after
    assert confidence([1, 2, 9, 4], [0.9, 0.6, 0.8, 0.01], eos, "min") == pytest.approx(0.6)
    assert confidence([1, 2, 9], [0.9, 0.6, 0.8], eos, "first") == pytest.approx(0.9)
    assert confidence([1, 2, 9], [0.5, 0.5, 1.0], eos, "sequence") == pytest.approx(0.25)
    assert confidence([1, 2, 9], [0.5, 0.5, 1.0], eos, "geometric_mean") == pytest.approx(0.25 ** (1 / 3))
    for name in STATISTICS:
        assert 0.0 <= confidence([1, 2], [1e-30, 1.0], eos, name) <= 1.0
    assert confidence([], [], eos) == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_a_threshold_is_a_number_from_0_to_1(bad):
    from pocketvlm.errors import PocketVLMError

    with pytest.raises(PocketVLMError, match="--min-confidence"):
        check_min_confidence(bad)


def test_every_backend_reports_token_probabilities_the_same_way(tiny_model, tmp_path, image_file):
    """The confidence comes from the one generation loop: each backend's probabilities match the reference's."""
    from PIL import Image

    from pocketvlm.prompt import Request
    from pocketvlm.runtime import open_backend

    import numpy as np

    def softmax_of_chosen(logits, token_ids):
        out = []
        for x, t in zip(logits, token_ids):
            x = np.asarray(x, dtype=np.float64)
            e = np.exp(x - x.max())
            out.append(float(e[t] / e.sum()))
        return out

    request = Request("What color is the circle?", images=[Image.open(image_file)])
    ref = open_backend(tiny_model).run(request, 6, ignore_eos=True, with_logits=True)
    assert all(0.0 < p <= 1.0 for p in ref.token_probs) and len(ref.token_probs) == 6
    assert ref.token_probs == pytest.approx(softmax_of_chosen(ref.logits, ref.token_ids), rel=1e-5)
    for fmt, quant, engine in (("onnx", "fp32", "onnxruntime"), ("mlx", "fp32", "mlx_vlm"), ("gguf", "f16", "llama_cpp")):
        pytest.importorskip(engine)
        out = tmp_path / fmt
        assert run_cli("export", tiny_model, "--to", fmt, "--quant", quant, "--out", out, "--quiet").returncode == 0
        got = open_backend(out).run(request, 6, ignore_eos=True, with_logits=True)
        assert got.token_ids == ref.token_ids, fmt
        # each backend's probability is the softmax of its own logits, taken by the one loop
        assert got.token_probs == pytest.approx(softmax_of_chosen(got.logits, got.token_ids), rel=1e-5), fmt
        # and it differs from the reference's only as far as the logits do: a logit error of at most m moves a
        # log-probability by at most 2m (softmax's own bound), whatever the precision of the format
        for step, (p, q, a, b) in enumerate(zip(got.token_probs, ref.token_probs, got.logits, ref.logits)):
            m = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            assert abs(np.log(p) - np.log(q)) <= 2 * m + 1e-6, (fmt, step, p, q, m)
        if quant == "fp32":
            assert got.token_probs == pytest.approx(ref.token_probs, abs=1e-4), fmt


# ------------------------------------------------------------------------------------------- refusals

def test_flags_that_cannot_work_are_one_line_before_any_answer(tiny_model):
    q = ("ask", tiny_model, "What is it?")
    assert_user_error(run_cli(*q, "--fallback", "mistral-medium-3.5", "--no-cloud"), "--no-cloud forbids")
    assert_user_error(run_cli(*q, "--fallback", "mistral-medium-3.5", env={"POCKETVLM_OFFLINE": "1"}),
                      "POCKETVLM_OFFLINE=1 forbids")
    proc = run_cli(*q, "--fallback", "mistral-medium-3.5", env={"MISTRAL_API_KEY": ""})
    assert_user_error(proc, "needs an API key in $MISTRAL_API_KEY")
    assert_user_error(run_cli(*q, "--fallback", "acme"), "acme")
    assert_user_error(run_cli(*q, "--min-confidence", "0.3"), "need --fallback")
    assert_user_error(run_cli(*q, "--fallback", "mistral-medium-3.5", "--min-confidence", "2",
                              env={"MISTRAL_API_KEY": KEY}), "--min-confidence")
    assert_user_error(run_cli("serve", tiny_model, "--fallback", "mistral-medium-3.5", "--no-cloud"),
                      "--no-cloud forbids")


# ---------------------------------------------------------------------------------- the loopback cloud

@pytest.fixture(scope="module")
def cloud():
    """`pocketvlm serve` on the full micro model, as a user starts it, on a free loopback port."""
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(MICRO), "--port", "0",
                             "--model-id", "micro"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POCKETVLM_API_KEY": KEY})
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
            url = m.group(1) if m else None
            if not line and proc.poll() is not None:
                break
        assert url, "serve did not start"
        yield url
    finally:  # also when it never started: no server left running beside the rest of the suite
        proc.terminate()
        proc.wait(timeout=30)


def routed_ask(model, image, question, *extra, url, env=None):
    proc = run_cli("ask", model, question, "--image", image, "--json", "--fallback", "openai-compatible",
                   "--fallback-base-url", url, "--fallback-model", "micro", *extra,
                   env={"OPENAI_API_KEY": KEY, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_ask_escalates_below_the_threshold_and_logs_it(cloud):
    entry = json.loads(HELDOUT.read_text())[0]
    image = HELDOUT.parent / entry["image"]
    never, log = routed_ask(WEAK, image, entry["question"], "--min-confidence", "0", url=cloud)
    assert never["route"] == "device" and never["answer"] == never["device_answer"]
    assert 0.0 <= never["confidence"] <= 1.0 and "route: device" in log
    always, log = routed_ask(WEAK, image, entry["question"], "--min-confidence", "1", url=cloud)
    if always["confidence"] < 1.0:
        assert always["route"] == "cloud" and always["cloud_model"] == "micro"
        assert always["answer"].strip(" .").lower() == entry["answer"]  # the full micro model's answer
        assert "route: cloud" in log and "sent the question and 1 image to micro" in log
    else:
        assert always["route"] == "device"


def test_the_cloud_receives_exactly_the_users_request(tmp_path):
    """Escalation sends the question and its image, nothing else: no system prompt, no device answer, no history."""
    from PIL import Image

    server = RawServer(mistral(KEY, {"mistral-medium-3-5"}, answer="red"))
    try:
        image = tmp_path / "q.png"
        Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
        proc = run_cli("ask", WEAK, "What color is the circle?", "--image", image, "--json", "--fallback",
                       "mistral-medium-3.5", "--fallback-base-url", server.url, "--min-confidence", "1",
                       env={"MISTRAL_API_KEY": KEY})
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["route"] == "cloud" and got["answer"] == "red" and got["cost_usd"] > 0
        (seen,) = server.requests
        messages = seen.body["messages"]
        assert [m["role"] for m in messages] == ["user"]
        kinds = [part["type"] for part in messages[0]["content"]]
        assert sorted(kinds) == ["image_url", "text"]
        text = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
        assert text == "What color is the circle?" and got["device_answer"] not in json.dumps(seen.body).replace(
            "What color is the circle?", "")
    finally:
        server.close()


def test_a_failing_cloud_keeps_the_device_answer(tmp_path, image_file):
    proc = run_cli("ask", WEAK, "What color is the circle?", "--image", image_file, "--json", "--fallback",
                   "openai-compatible", "--fallback-base-url", "http://127.0.0.1:9/v1", "--min-confidence", "1",
                   env={"OPENAI_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["route"] == "device" and "the cloud failed" in got["reason"] and got["answer"] == got["device_answer"]


def test_serve_routes_behind_one_url(cloud, tmp_path):
    """`serve --fallback`: the endpoint answers on the device or from the cloud, and says which."""
    import base64
    import http.client

    entry = json.loads(HELDOUT.read_text())[1]
    png = (HELDOUT.parent / entry["image"]).read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(WEAK), "--port", "0", "--fallback",
                             "openai-compatible", "--fallback-base-url", cloud, "--fallback-model", "micro",
                             "--min-confidence", "1"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENAI_API_KEY": KEY})
    try:
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited"
            m = re.search(r"127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        body = {"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": "data:image/png;base64," + base64.b64encode(png).decode()},
            {"type": "text", "text": entry["question"]}]}]}
        for stream in (False, True):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read().decode()
            assert resp.status == 200, raw
            if stream:
                events = [json.loads(line[5:]) for line in raw.splitlines()
                          if line.startswith("data: {")]
                routing = events[-1]["pocketvlm"]
                text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events)
            else:
                reply = json.loads(raw)
                routing, text = reply["pocketvlm"], reply["choices"][0]["message"]["content"]
            assert routing["route"] in ("device", "cloud") and 0 <= routing["confidence"] <= 1
            if routing["confidence"] < 1:
                assert routing["route"] == "cloud" and text.strip(" .").lower() == entry["answer"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "route: " in proc.stderr.read()


def test_routing_raises_accuracy_escalating_a_minority_of_the_questions_the_edge_gets_wrong(cloud, tmp_path):
    """The sweep on the whole held-out split: with the weak model on the device and the full one as the cloud,
    some threshold lifts accuracy over the device alone while escalating a minority; the escalated questions are
    the ones the device gets wrong more often than those it keeps."""
    from pocketvlm.bench_device.router import error_rates

    out = tmp_path / "sweep"
    proc = run_cli("bench", "router", WEAK, "--fallback", "openai-compatible", "--fallback-base-url", cloud,
                   "--fallback-model", "micro", "--target-accuracy", "0.9", "--out", out, "--quiet",
                   env={"OPENAI_API_KEY": KEY}, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file() and (out / "router.png").is_file()
    device, cloud_acc = results["device_accuracy"], results["cloud_accuracy"]
    assert device < cloud_acc  # the edge is weaker, or routing has nothing to win
    table = results["sweep"]["table"]
    assert table[0]["threshold"] == 0 and table[0]["escalated"] == 0 and table[0]["accuracy"] == device
    better = [r for r in table if r["accuracy"] > device and 0 < r["escalated"] < 0.5]
    assert better, table
    for r in better:
        wrong_escalated, wrong_kept = error_rates(results["rows"], r["threshold"], results["sweep"]["statistic"])
        assert wrong_escalated > wrong_kept, (r, wrong_escalated, wrong_kept)
    aurocs = results["separation"]
    assert aurocs[results["sweep"]["statistic"]] > 0.5  # the confidence tells right from wrong better than chance
