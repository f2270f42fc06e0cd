"""A SmolLM2-style byte-level BPE tokenizer trained locally, with SmolVLM2's special tokens and chat template.

Real SmolVLM2 weights cannot be downloaded here, and neither can their tokenizer, so make-model trains one in a
second on a small built-in corpus. It behaves like the real one where it matters to exporters and runtimes:
the same pre-tokenizer (single digits + GPT-2 byte-level regex, llama.cpp's "smollm" pre-type), "\\n\\n" as one
token, the same special tokens, and -- for the real-shape presets -- the same ids (<image> = 49190,
<end_of_utterance> = 49279, length 49280).
"""

from __future__ import annotations

import json
import random

from .presets import tokenizer_layout

# SmolVLM2's chat template (transformers' DEFAULT_CHAT_TEMPLATE for smolvlm, the one the checkpoints ship).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_SPECIALS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
)
END_OF_UTTERANCE = "<end_of_utterance>"

_WORDS = (
    "the a an is are what which how many where there this that of in on at and or with to it its "
    "color colour shape number word written drawn image picture photo video frame frames shows describe "
    "red green blue yellow orange purple white black gray pink brown "
    "circle square triangle star shapes circles squares triangles "
    "left right top bottom middle center above below next "
    "one two three four five six seven eight nine ten zero "
    "yes no cat dog car tree sky house person small large big "
    "you provided following series from question answer please"
).split()


def _corpus(rng: random.Random, n: int = 4000):
    """Chat-shaped lines, numbers and blank lines, so the merges SmolVLM2 prompts rely on get learned."""
    for _ in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12)))
        line = words[0].upper() + words[1:] + rng.choice(["?", ".", "!", ",", ""])
        kind = rng.random()
        if kind < 0.25:
            line = f"User:{line}<end_of_utterance>\nAssistant: {rng.choice(_WORDS)}."
        elif kind < 0.45:
            line = line + "\n\n" + rng.choice(_WORDS) + "\n"
        elif kind < 0.6:
            line = f"{line} {rng.randint(0, 99999)} {rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        yield line
    for _ in range(n):  # SmolVLM2's image prompts and its video outro are full of blank lines
        yield "\n\n"


def build_tokenizer(layout: str, seed: int = 0):
    """Train the tokenizer and wrap it for transformers. `layout` is a key of presets.json's _tokenizers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = tokenizer_layout(layout)
    bpe_vocab = spec.get("bpe_vocab", 400)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre_tokenizers)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=BASE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(_corpus(random.Random(seed))), trainer)

    if "base_vocab" in spec:
        # Pad the base vocabulary with unreachable entries (no merge produces them) so the added tokens land on
        # SmolVLM2's ids.
        model = json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        while len(vocab) < spec["base_vocab"]:
            vocab[f"<filler_{len(vocab)}>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = _pre_tokenizer(pre_tokenizers)
        reserved = spec["reserved"]
    else:
        before = tok.get_vocab_size() + len(IMAGE_SPECIALS) + 1
        reserved = (-before) % spec["pad_to_multiple"]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = IMAGE_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(reserved)] + [END_OF_UTTERANCE]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS + added])

    if tok.token_to_id("\u010a\u010a") is None:  # "\n\n" in byte-level form; llama.cpp's mtmd looks it up
        raise RuntimeError("tokenizer training did not learn the '\\n\\n' token")
    for key, token in (("image_token_id", "<image>"), ("eos_token_id", END_OF_UTTERANCE)):
        if key in spec and tok.token_to_id(token) != spec[key]:
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {spec[key]}")
    if "vocab_size" in spec and tok.get_vocab_size() != spec["vocab_size"]:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {spec['vocab_size']}")

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token=END_OF_UTTERANCE,
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=8192,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": END_OF_UTTERANCE,
        },
    )


def _pre_tokenizer(pre_tokenizers):
    # SmolLM2's: every digit on its own, then GPT-2's byte-level regex split.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
