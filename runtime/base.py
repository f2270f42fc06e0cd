"""The one interface every backend implements, and the summary every caller (ask, check, bench) reads.

A backend answers a Request by yielding Steps, one per generated token, each stamped with the time it became
available. `run()` turns those into a Result with the same timings for every format, so no caller special-cases a
backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pocketvlm.prompt import Processor, Request


@dataclass
class Step:
    token_id: int
    text: str                      # newly decoded text (may be "" while a UTF-8 character is incomplete)
    time: float                    # time.perf_counter() when the token was known
    logits: np.ndarray | None = None  # float32 [vocab], only when asked for
    encode_s: float | None = None  # first step only: vision encoder time, where the engine exposes it
    prefill_s: float | None = None  # first step only: time to run the prompt through the text model
    prompt_tokens: int | None = None  # first step only: length of the prompt the model saw


@dataclass
class Timings:
    load_s: float
    encode_s: float | None
    ttft_s: float
    prefill_tok_s: float | None
    decode_tok_s: float | None
    total_s: float


@dataclass
class Result:
    answer: str
    token_ids: list[int]
    prompt_tokens: int
    backend: str
    quant: str
    timings: Timings
    peak_memory_bytes: int | None = None  # the engine's own figure where it keeps one (bench measures RSS)
    logits: list[np.ndarray] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("logits")
        return d


class Backend(ABC):
    """A loaded model of one format and quant. Subclasses set name, quant, processor and load_s in __init__."""

    name: str
    quant: str
    processor: Processor
    load_s: float

    def describe(self) -> dict:
        return {"backend": self.name, "quant": self.quant, "load_s": self.load_s}

    def peak_memory_bytes(self) -> int | None:
        """Peak memory the engine itself accounts for, if it keeps such a figure."""
        return None

    def prompt_token_ids(self, request: Request) -> list[int]:
        return self.processor.encode(request).input_ids.tolist()

    @abstractmethod
    def generate(self, request: Request, max_tokens: int, *, ignore_eos: bool = False,
                 with_logits: bool = False, force: Sequence[int] | None = None) -> Iterator[Step]:
        """Greedy decoding: yield one Step per generated token (the end-of-sequence token included).

        With `force` (teacher forcing, for fidelity checks), step i still reports the model's own choice and
        logits, but force[i] is what gets fed back; decoding runs for exactly len(force) steps.
        """

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """The answer a user reads: the text up to the first end-of-answer token."""
        eos = self.processor.eos_token_ids
        end = next((i for i, t in enumerate(token_ids) if t in eos), len(token_ids))
        return self.processor.decode(list(token_ids[:end])).strip()

    def run(self, request: Request, max_tokens: int, *, ignore_eos: bool = False, with_logits: bool = False,
            on_step: Callable[[Step], None] | None = None) -> Result:
        """Generate to the end, streaming to on_step, and summarise."""
        start = time.perf_counter()
        steps: list[Step] = []
        for step in self.generate(request, max_tokens, ignore_eos=ignore_eos, with_logits=with_logits):
            steps.append(step)
            if on_step:
                on_step(step)
        end = time.perf_counter()
        ids = [s.token_id for s in steps]
        first = steps[0] if steps else None
        prompt_tokens = (first.prompt_tokens if first and first.prompt_tokens is not None
                         else len(self.prompt_token_ids(request)))
        decode_s = steps[-1].time - first.time if len(steps) > 1 else None
        timings = Timings(
            load_s=self.load_s,
            encode_s=first.encode_s if first else None,
            ttft_s=(first.time - start) if first else end - start,
            prefill_tok_s=(prompt_tokens / first.prefill_s) if first and first.prefill_s else None,
            decode_tok_s=((len(steps) - 1) / decode_s) if decode_s else None,
            total_s=end - start,
        )
        return Result(
            answer=self.processor.decode(ids).strip() if ignore_eos else self.answer_text(ids),
            token_ids=ids,
            prompt_tokens=prompt_tokens,
            backend=self.name,
            quant=self.quant,
            timings=timings,
            peak_memory_bytes=self.peak_memory_bytes(),
            logits=[s.logits for s in steps] if with_logits else None,
        )


class TextStream:
    """Turns token ids into text deltas in O(1) decode work per token, holding back a partial UTF-8 character.

    Only a short window is re-decoded each step (the tokens since the last emitted piece, plus the one before for
    context), as text-generation-inference does, instead of the whole answer.
    """

    def __init__(self, processor: Processor):
        self.processor = processor
        self.ids: list[int] = []
        self.prefix = 0  # window start: context for the byte-level decoder
        self.read = 0    # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.processor.decode
        before = decode(self.ids[self.prefix:self.read])
        text = decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""


def next_input(token_id: int, n_generated: int, position: int, *, max_tokens: int, context: int,
               eos: set[int], ignore_eos: bool, force: Sequence[int] | None) -> int | None:
    """The token to feed back after the n-th generated one, or None when decoding ends (end of sequence, token
    budget, context window, or the end of the forced sequence)."""
    if force is not None:
        return force[n_generated - 1] if n_generated < len(force) and position < context else None
    if (token_id in eos and not ignore_eos) or n_generated >= max_tokens or position >= context:
        return None
    return token_id
