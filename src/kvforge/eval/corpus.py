"""Real English text available offline: the Python documentation that ships with CPython.

`pydoc_data.topics` holds the language reference and library prose behind `help()` (~460 k
characters). It is part of every CPython install, so nothing is downloaded. Grammar blocks and
code samples are dropped; what remains is paragraphs of documentation prose.
"""

from __future__ import annotations

import re
from functools import lru_cache

SOURCE = "CPython's pydoc_data.topics (the Python language reference behind help())"
_WORD = re.compile(r"^[a-z]{4,10}$")


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines):  # code, grammar, tables
        return False
    words = paragraph.split()
    if len(words) < 12:
        return False
    plain = sum(1 for w in words if w.strip(".,;:()'\"").isalpha())
    return plain / len(words) > 0.8 and "::=" not in paragraph and ">>>" not in paragraph


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Prose paragraphs, each on one line, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            para = para.strip()
            if _is_prose(para):
                out.append(" ".join(para.split()).replace("*", "").replace("`", ""))
    return tuple(out)


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Distinct plain lowercase words of the corpus, sorted (for word-list tasks)."""
    found = {w for p in paragraphs() for w in (t.strip(".,;:()'\"").lower() for t in p.split()) if _WORD.match(w)}
    return tuple(sorted(found))
