"""The token rows of a reconstruction pass (KVzip): the model is asked to repeat the context.

Each prompt row just stored is cut into pieces of `Reconstruction.chunk` tokens; the pass for a
piece feeds "repeat the previous context" (for later pieces "repeat the part ... starting with"
and the last `overlap` tokens before the piece), the chat template's end of the user turn and
start of the assistant's, then the piece itself. Its queries score the entries of that piece.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from kvforge.policies.base import Reconstruction


@dataclass
class Pass:
    """One reconstruction pass over a batch: per row, the ids fed and the piece they repeat."""

    rows: list[list[int]]  # ids to feed per row ([] for a row with no piece left)
    starts: list[int]  # per row, offset of the repeated piece in the row's prompt part
    ends: list[int]


def assistant_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text between the end of a user message and the assistant's answer ("\n" without a
    chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    marker = "\x00KVFORGE_END\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    return text.split(marker, 1)[1]


def passes(tokenizer: PreTrainedTokenizerBase, spec: Reconstruction, rows: list[list[int]]) -> list[Pass]:
    """The passes that repeat every row of `rows`, piece by piece (pass i repeats piece i of
    every row that has one)."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    first, later, turn = encode(spec.first), encode(spec.later), encode(assistant_turn(tokenizer))
    count = max((len(r) + spec.chunk - 1) // spec.chunk for r in rows)
    out = []
    for i in range(count):
        ids, starts, ends = [], [], []
        for row in rows:
            start, end = i * spec.chunk, min(len(row), (i + 1) * spec.chunk)
            if start >= end:
                ids.append([])
            else:
                lead = first if i == 0 else later + row[max(0, start - spec.overlap) : start]
                ids.append(lead + turn + row[start:end])
            starts.append(start)
            ends.append(max(start, end))
        out.append(Pass(ids, starts, ends))
    return out
