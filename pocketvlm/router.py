"""Edge first, cloud only when unsure: answer on the device, and send the question to a hosted API only when the
device's own confidence in its answer is below a threshold.

Confidence is computed from the on-device generation itself, the same way for every backend: the probabilities
the model gave the tokens of its answer (Step.prob, from the one generation loop in runtime/base.py), up to and
including its end-of-answer token, reduced by one statistic (STATISTICS; the default chosen by measurement,
docs/BENCH.md "Router"). It is a number in [0, 1]: `--min-confidence 0` never escalates, `1` always does (unless the
device's confidence is exactly 1).

Privacy is the point of running on the device, so escalation is opt-in per command (`--fallback`), sends exactly
the request the user gave (the question and its images, nothing else: no device answer, no history), is logged per
request (route, reason, cost), and `--no-cloud` (or POCKETVLM_OFFLINE=1) guarantees nothing leaves the machine.

Two steps, so a server can hold its model lock for the first only: `on_device` (the device's answer, its
confidence, and the PNGs the cloud would get) and `escalate` (the cloud call, bounded by `--fallback-timeout`).
`route` is both in a row.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .errors import PocketVLMError, one_line

OFFLINE_ENV = "POCKETVLM_OFFLINE"


def _min(p: Sequence[float]) -> float:
    return min(p)


def _geometric_mean(p: Sequence[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-300)) for x in p) / len(p))


def _first(p: Sequence[float]) -> float:
    return p[0]


def _sequence(p: Sequence[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-300)) for x in p))


# token probabilities of the answer -> confidence in [0, 1]
STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": _min, "geometric_mean": _geometric_mean, "first": _first, "sequence": _sequence,
}
# Chosen by measurement (docs/BENCH.md, "Router: which confidence, which threshold"): through the weak micro model,
# min, geometric_mean and sequence separate right from wrong answers equally well (AUROC 0.78-0.82, bootstrap
# intervals straddling 0), first worse than chance; min is kept as the one a user can reason about ("some token of
# this answer was a coin toss"). 0.5 sits inside the plateau (0.4-0.8) where, on both the calibration and the
# held-out split, every kept answer was right and a quarter of the questions stayed on the device.
DEFAULT_STATISTIC = "min"
DEFAULT_MIN_CONFIDENCE = 0.5
# The whole cloud call, retries and a dripping answer included. The device's answer is already in hand when the
# cloud is asked, so waiting longer only delays an answer the user has: a hosted completion of a few hundred tokens
# takes seconds, and a minute still leaves room for a retry after a 429 or a 503; the client's own ceiling (10
# minutes, meant for the bench's measurements) is far past what anyone at a prompt or behind `serve` waits.
DEFAULT_FALLBACK_TIMEOUT = 60.0
MAX_FALLBACK_TIMEOUT = 600.0   # the cloud client's own whole-call ceiling


def answer_probs(token_ids: Sequence[int], probs: Sequence[float], eos: set[int]) -> list[float]:
    """The probabilities of the answer's tokens: up to and including the first end-of-answer token."""
    end = next((i + 1 for i, t in enumerate(token_ids) if t in eos), len(token_ids))
    return list(probs[:end])


def confidence(token_ids: Sequence[int], probs: Sequence[float], eos: set[int],
               statistic: str = DEFAULT_STATISTIC) -> float:
    p = answer_probs(token_ids, probs, eos)
    if not p:
        return 0.0
    return float(min(1.0, max(0.0, STATISTICS[statistic](p))))


def check_min_confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 \
            or math.isnan(float(value)):
        raise PocketVLMError(f"--min-confidence {value}: give a number from 0 (never escalate) to 1 (always)")
    return float(value)


def check_fallback_timeout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_FALLBACK_TIMEOUT:
        raise PocketVLMError(f"--fallback-timeout {value}: give the seconds the cloud may take, more than 0 and at "
                             f"most {MAX_FALLBACK_TIMEOUT:g}")
    return float(value)


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class Fallback:
    """Where unsure questions go: a provider's callable model and its key."""

    plan: object        # bench_device.providers.CloudPlan
    key: str | None
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    statistic: str = DEFAULT_STATISTIC
    timeout: float = DEFAULT_FALLBACK_TIMEOUT   # seconds for the whole cloud call
    allow_plain_http: bool = False              # http:// to a host other than this machine

    @property
    def provider(self):
        return self.plan.call

    def ask_options(self) -> dict:
        """What the cloud client is told for each call: the whole-call deadline and the plain-http rule."""
        return {"total_timeout": self.timeout, "allow_plain_http": self.allow_plain_http}

    @classmethod
    def configure(cls, name: str | None, *, model: str | None = None, base_url: str | None = None,
                  providers_file=None, min_confidence: float | None = None, no_cloud: bool = False,
                  timeout: float | None = None, allow_plain_http: bool = False):
        """The fallback the flags ask for, or None; every way it cannot work is one line, before any answer (and
        before anything connects: the base URL is checked here)."""
        if name is None:
            if min_confidence is not None or model or base_url is not None or timeout is not None \
                    or allow_plain_http:
                raise PocketVLMError("--min-confidence, --fallback-model, --fallback-base-url, --fallback-timeout "
                                     "and --allow-plain-http need --fallback PROVIDER (where unsure questions go)")
            return None
        if no_cloud or offline():
            why = "--no-cloud" if no_cloud else f"{OFFLINE_ENV}=1"
            raise PocketVLMError(f"--fallback {name} sends questions to a cloud API, and {why} forbids anything "
                                 f"leaving this machine; drop one of them")
        from pocketvlm.bench_device import cloud as cloud_api

        plan = cloud_api.plan_cloud(name, path=providers_file, model=model, base_url=base_url,
                                    allow_plain_http=allow_plain_http, base_url_flag="--fallback-base-url")
        if plan.call is None:
            raise PocketVLMError(f"--fallback {name}: {plan.requested.name} is retired and the price data names no "
                                 f"callable successor; pass --fallback-model with a current model id")
        key = cloud_api.read_key(plan.call.key_env)
        if key is None and plan.call.dialect == "mistral":
            raise PocketVLMError(f"--fallback {name} needs an API key in ${plan.call.key_env} (it is not set)")
        threshold = DEFAULT_MIN_CONFIDENCE if min_confidence is None else check_min_confidence(min_confidence)
        seconds = DEFAULT_FALLBACK_TIMEOUT if timeout is None else check_fallback_timeout(timeout)
        return cls(plan, key, threshold, timeout=seconds, allow_plain_http=allow_plain_http)


@dataclass
class Routed:
    """One routed answer: what the user reads and where it came from."""

    answer: str
    route: str                 # "device" | "cloud"
    confidence: float          # the device's, in [0, 1]
    min_confidence: float | None
    reason: str
    device: object             # runtime.base.Result: the on-device generation (always run first)
    cloud_model: str | None = None
    cost_usd: float | None = None
    cloud_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"route": self.route, "confidence": self.confidence, "min_confidence": self.min_confidence,
                "reason": self.reason, "cloud_model": self.cloud_model, "cost_usd": self.cost_usd,
                "cloud_s": self.cloud_s, "device_answer": self.device.answer}


def _png(image) -> bytes:
    from .media import to_rgb

    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Escalation:
    """A device answer below the threshold, and what the cloud is to be sent: the user's question and images."""

    kept: Routed               # the device's answer, given if the cloud fails
    question: str
    pngs: list[bytes]


def on_device(backend, request, max_tokens: int, fallback: Fallback | None, *, on_step=None) -> Routed | Escalation:
    """The device step: answer REQUEST on the device and judge its confidence. A Routed when that answer stands;
    an Escalation when the cloud is to be asked (the images already encoded, so nothing of this step is left for
    the cloud step but the call)."""
    device = backend.run(request, max_tokens, on_step=on_step)
    eos = backend.processor.eos_token_ids
    statistic = fallback.statistic if fallback else DEFAULT_STATISTIC
    conf = confidence(device.token_ids, device.token_probs, eos, statistic)
    if fallback is None:
        return Routed(device.answer, "device", conf, None, "no fallback configured", device)
    threshold = fallback.min_confidence
    if conf >= threshold:
        return Routed(device.answer, "device", conf, threshold, f"confidence {conf:.3f} >= {threshold:g}", device)
    if request.video is not None:
        return Routed(device.answer, "device", conf, threshold,
                      f"confidence {conf:.3f} < {threshold:g}, but a video is not sent to the cloud (images only)",
                      device)
    kept = Routed(device.answer, "device", conf, threshold, f"confidence {conf:.3f} < {threshold:g}", device)
    return Escalation(kept, request.question, [_png(i) for i in request.images or []])


def escalate(pending: Escalation, fallback: Fallback, max_tokens: int, *, ask=None) -> Routed:
    """The cloud step: send the question and images, within fallback.timeout for the whole call. A cloud failure
    or timeout keeps the device's answer and says why (the user still gets an answer, offline-first)."""
    from pocketvlm.bench_device import cloud as cloud_api

    kept, provider = pending.kept, fallback.provider
    ask = ask or cloud_api.ask
    try:
        reply = ask(provider, fallback.key, pending.question, pending.pngs, max_tokens, **fallback.ask_options())
    except PocketVLMError as e:
        why = (f"the cloud timed out (no complete answer within {fallback.timeout:g}s, --fallback-timeout)"
               if getattr(e, "reason", None) == "timeout" else f"the cloud failed ({one_line(e)})")
        return replace(kept, reason=f"{kept.reason}, but {why}; answered on the device")
    cost = (provider.cost(reply.prompt_tokens, reply.completion_tokens)
            if reply.prompt_tokens is not None and reply.completion_tokens is not None else None)
    return replace(kept, answer=reply.text.strip(), route="cloud", reason=f"{kept.reason}: escalated to "
                   f"{provider.model}", cloud_model=provider.model, cost_usd=cost, cloud_s=reply.total_s)


def route(backend, request, max_tokens: int, fallback: Fallback | None, *, on_step=None,
          ask=None) -> Routed:
    """Answer REQUEST on the device; if a fallback is set and the device's confidence is below its threshold,
    send the same question and images to the cloud and answer with that (on_device, then escalate)."""
    step = on_device(backend, request, max_tokens, fallback, on_step=on_step)
    return escalate(step, fallback, max_tokens, ask=ask) if isinstance(step, Escalation) else step


# CSI (ESC [ ... final byte), OSC and the other string sequences (ESC ] P X ^ _ ... up to BEL or ESC \), and any
# other ESC + one character; what is left of a control character after that is dropped one by one
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?",
                              re.DOTALL)


def for_terminal(text: str) -> str:
    """Text from a server made safe to print on a terminal: escape sequences and control characters (C0 but
    newline and tab, DEL, C1) removed, so an answer cannot move the cursor, retitle the window, hide text or
    write to the clipboard. Only for what goes to a terminal: JSON output keeps the text as it came (escaped)."""
    text = _ESCAPE_SEQUENCE.sub("", text)
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


def log_line(r: Routed, images: int) -> str:
    """The per-request privacy log: where the answer came from, why, and what it cost. Printed on a terminal, so
    nothing in it may steer one (the reason can quote a server's error message)."""
    if r.route == "cloud":
        cost = f"${r.cost_usd:.6f}" if r.cost_usd is not None else "cost unknown"
        sent = f"the question{f' and {images} image' + ('s' if images > 1 else '') if images else ''}"
        line = f"route: cloud ({r.reason}; sent {sent} to {r.cloud_model}, {cost})"
    else:
        line = f"route: device ({r.reason})"
    return " ".join(for_terminal(line).split())
