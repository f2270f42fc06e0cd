"""The one interface every backend implements, the one generation loop they all share, and the summary every
caller (ask, serve, check, bench) reads.

A backend supplies only what its engine does differently: `image_features` (the vision encoder + connector, a few
tiles per call), `prefill` (those features merged into the prompt, the prompt run, the last position's logits) and
`decode` (feed one token, return the next logits). `generate` -- the loop
below -- does everything else once for every format: greedy choice, the chosen token's probability, teacher
forcing, stop rules (end of sequence, token budget, context window), streaming text, and timing. `run()` turns the
steps into a Result with the same timings for every format, so no caller special-cases a backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pocketvlm.errors import PromptError
from pocketvlm.prompt import Encoded, Processor, Request


@dataclass
class Step:
    token_id: int
    text: str                      # newly decoded text (may be "" while a UTF-8 character is incomplete)
    time: float                    # time.perf_counter() when the token was known
    prob: float                    # the model's probability of this token (softmax of its logits)
    logits: np.ndarray | None = None  # float32 [vocab], only when asked for
    encode_s: float | None = None  # first step only: vision encoder time, where the engine exposes it
    prefill_s: float | None = None  # first step only: time to run the prompt through the text model
    prompt_tokens: int | None = None  # first step only: length of the prompt the model saw
    image_tiles: int | None = None    # first step only: tiles the images (and video frames) were cut into
    image_tokens: int | None = None   # first step only: <image> positions in the prompt


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
    token_probs: list[float]
    prompt_tokens: int
    backend: str
    quant: str
    timings: Timings
    image_tiles: int = 0
    image_tokens: int = 0
    peak_memory_bytes: int | None = None  # the engine's own figure where it keeps one (bench measures RSS)
    logits: list[np.ndarray] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("logits")
        return d


@dataclass
class Prefilled:
    """What a backend's prefill hands the loop: the prompt's last logits, the vision encoder's time (None when
    there were no images or the engine does not separate it), and whatever the engine needs to continue (its KV
    cache, a context handle, ...), passed back to every decode call."""

    logits: Any
    encode_s: float | None
    state: Any = None


class Backend(ABC):
    """A loaded model of one format and quant. Subclasses set name, quant, processor and load_s in __init__ and
    implement image_features, prefill and decode."""

    name: str
    quant: str
    processor: Processor
    load_s: float
    # What the vision encoder's weights are, as the artifact's manifest records it ("fp32", "int8", "q8_0", ...):
    # describe() and check report it, since the vision tower is quantized differently from the text model.
    vision_weights: str = "unknown"
    # Tiles per vision-encoder call: the encoder's activations (attention scores grow with the square of a tile's
    # patches) are held for this many tiles at a time, not for all of a 13- or 17-tile image at once. Each
    # backend's value was chosen by measuring peak RSS against TTFT at 13 tiles (docs/BENCH.md).
    vision_batch: int = 1

    def describe(self) -> dict:
        return {"backend": self.name, "quant": self.quant, "load_s": self.load_s,
                "vision": {"weights": self.vision_weights, "tiles_per_call": self.vision_batch}}

    def peak_memory_bytes(self) -> int | None:
        """Peak memory the engine itself accounts for, if it keeps such a figure."""
        return None

    @property
    def context_length(self) -> int:
        """Most positions (prompt + answer) this backend can hold."""
        return self.processor.config.context_length

    context_hint = "shorten the question or use fewer/smaller images"

    def prompt_token_ids(self, request: Request) -> list[int]:
        return self.processor.encode(request).input_ids.tolist()

    # ------------------------------------------------------------------------------------ engine steps

    @abstractmethod
    def image_features(self, enc: Encoded) -> np.ndarray:
        """The vision encoder + connector output for enc's tiles, float32 [tiles, image_seq_len, hidden], in the
        prompt's order, computed `vision_batch` tiles per call (real_tiles + tile_batches below). prefill merges
        exactly these (the same code path), and `check` compares them with the reference's."""

    @abstractmethod
    def prefill(self, enc: Encoded, budget: int) -> Prefilled:
        """Encode enc's images, run its prompt (input_ids) and return the last position's logits. `budget`: the
        most tokens that will be decoded after it (engines that size a KV cache up front use it)."""

    @abstractmethod
    def decode(self, state: Any, token_id: int, position: int) -> Any:
        """Feed token_id at `position` (0-based, the prompt occupying 0 .. n-1) and return the next logits."""

    def pick(self, logits: Any, with_logits: bool) -> tuple[int, float, np.ndarray | None]:
        """The greedy token of a logits handle, its probability, and the logits as float32 when asked for."""
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        token = int(np.argmax(x))
        top = float(x[token])
        prob = 1.0 / float(np.exp(x.astype(np.float64) - top).sum())  # softmax at the argmax, overflow-free
        return token, prob, (x.copy() if with_logits else None)

    def lookahead(self, state: Any, logits: Any, position: int) -> Any:
        """Optionally start decoding the greedy token of `logits` before Python has read it (an engine that
        computes asynchronously, like MLX, overlaps the next step with the caller's work). Returns the next
        logits handle, or None to decode after the caller's turn as usual."""
        return None

    # --------------------------------------------------------------------------------------------- loop

    def generate(self, request: Request, max_tokens: int, *, ignore_eos: bool = False,
                 with_logits: bool = False, force: Sequence[int] | None = None) -> Iterator[Step]:
        """Greedy decoding: yield one Step per generated token (the end-of-sequence token included).

        With `force` (teacher forcing, for fidelity checks), step i still reports the model's own choice and
        logits, but force[i] is what gets fed back; decoding runs for exactly len(force) steps.
        """
        enc = self.processor.encode(request)
        n_prompt = len(enc.input_ids)
        context = self.context_length
        if n_prompt >= context:
            raise PromptError(f"the prompt is {n_prompt} tokens, this {self.name} {self.quant} model holds "
                              f"{context}; {self.context_hint}")
        steps = len(force) if force is not None else max_tokens
        eos = self.processor.eos_token_ids
        stream = TextStream(self.processor)
        start = time.perf_counter()
        pre = self.prefill(enc, steps)
        prefilled = time.perf_counter()
        logits, position = pre.logits, n_prompt
        for n in range(1, steps + 1):
            # free-running greedy decoding feeds back the argmax itself: an engine may start on it early
            ahead = (self.lookahead(pre.state, logits, position)
                     if force is None and not with_logits and n < steps and position < context else None)
            token, prob, kept = self.pick(logits, with_logits)
            first = n == 1
            yield Step(token_id=token, text=stream.push(token), time=time.perf_counter(), prob=prob, logits=kept,
                       encode_s=pre.encode_s if first else None,
                       prefill_s=(prefilled - start - (pre.encode_s or 0.0)) if first else None,
                       prompt_tokens=n_prompt if first else None,
                       image_tiles=enc.tiles if first else None,
                       image_tokens=int((enc.input_ids == self.processor.image_token_id).sum()) if first else None)
            fed = next_input(token, n, position, max_tokens=max_tokens, context=context, eos=eos,
                             ignore_eos=ignore_eos, force=force)
            if fed is None:
                return
            logits = ahead if ahead is not None else self.decode(pre.state, fed, position)
            position += 1

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
        prompt_tokens = first.prompt_tokens if first else len(self.prompt_token_ids(request))
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
            token_probs=[s.prob for s in steps],
            prompt_tokens=prompt_tokens,
            backend=self.name,
            quant=self.quant,
            timings=timings,
            image_tiles=(first.image_tiles or 0) if first else 0,
            image_tokens=(first.image_tokens or 0) if first else 0,
            peak_memory_bytes=self.peak_memory_bytes(),
            logits=[s.logits for s in steps] if with_logits else None,
        )


def real_tiles(pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One request's tiles [1, tiles, 3, S, S] and masks [1, tiles, S, S] -> [n, 3, S, S], [n, S, S] without
    all-zero tiles, which are batch padding and which transformers' get_image_features drops too (if every tile is
    zero, the first one stays)."""
    tiles = pixel_values.reshape(-1, *pixel_values.shape[2:])
    masks = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[2:])
    real = tiles.reshape(len(tiles), -1).any(axis=1)
    real[0] |= not real.any()
    return tiles[real], masks[real]


def tile_batches(n_tiles: int, batch: int) -> list[slice]:
    """Consecutive slices of at most `batch` tiles covering 0 .. n_tiles."""
    batch = max(1, int(batch))
    return [slice(s, min(s + batch, n_tiles)) for s in range(0, n_tiles, batch)]


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
