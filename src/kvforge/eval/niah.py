"""RULER-style needle-in-a-haystack cases, generated offline and deterministically from a seed.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
2024: a "special magic number" needle in a repetitive noise haystack, asked for with an
answer prefix the model continues.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
KEYS = (
    "amber-falcon", "quiet-harbor", "silver-orchard", "crimson-lantern", "hollow-meadow", "brisk-glacier",
    "velvet-canyon", "misty-beacon", "golden-thicket", "rapid-summit", "lunar-willow", "copper-delta",
)  # fmt: skip


@dataclass
class NeedleCase:
    context: str  # what gets compressed
    question: str  # appended after compression
    answer_prefix: str  # the start of the answer the model continues
    answers: list[str]  # every reference that must appear in the output
    depth: float  # where the needle sits, 0 = start of the haystack, 1 = end


def needle_case(tokenizer: PreTrainedTokenizerBase, context_tokens: int, seed: int, depth: float = 0.5) -> NeedleCase:
    """One needle in noise, the haystack sized to about `context_tokens` tokens of context."""
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = f"One of the special magic numbers for {key} is: {value}. "
    per_noise = len(tokenizer(NOISE, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(INTRO + needle, add_special_tokens=False)["input_ids"])
    repeats = max(1, (context_tokens - fixed) // per_noise)
    before = round(repeats * depth)
    context = INTRO + NOISE * before + needle + NOISE * (repeats - before)
    return NeedleCase(
        context=context.strip(),
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        answers=[value],
        depth=depth,
    )


def is_correct(text: str, answers: list[str]) -> bool:
    """True when every reference answer appears in the output (case-insensitive)."""
    low = text.lower()
    return all(a.lower() in low for a in answers)
