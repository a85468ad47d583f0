"""Long-context tasks in the style of RULER, generated offline and deterministically from a seed.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024.
Each task builds a case from a seed and a filler size; `make_case` sizes the filler so the final
prompt (chat template + context + question + answer prefix) has the requested token count.
The context is what gets compressed; the question and answer prefix come after it.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from kvforge.eval import corpus
from kvforge.generate import build_prompt

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


@dataclass
class Case:
    task: str
    context: str  # compressed
    question: str  # appended after compression
    answer_prefix: str  # the start of the answer, continued by the model
    answers: list[str]
    match: str = "all"  # "all": credit per reference found; "any": full credit if one is found
    max_new_tokens: int = 32
    needles: list[str] = field(default_factory=list)  # sentences planted in the context
    depths: list[float] = field(default_factory=list)  # where each needle sits, 0 = start, 1 = end
    keyed: list[tuple[str, str]] = field(default_factory=list)  # (key, value) of each keyed needle


Builder = Callable[[random.Random, int, int], Case]  # (rng seeded per sample, filler units, target length)


def score(text: str, case: Case) -> float:
    """0-100: the share of reference answers found in `text` ("all"), or 100 if any is ("any")."""
    low = text.lower()
    found = [a.lower() in low for a in case.answers]
    if case.match == "any":
        return 100.0 * any(found)
    return 100.0 * sum(found) / len(found)


# --- haystacks -------------------------------------------------------------------------------


def plant(units: list[str], needles: list[str], depths: list[float], sep: str = " ") -> str:
    """Join filler `units` with each needle inserted at the unit boundary nearest its depth,
    depth being the fraction of the filler's characters before it."""
    starts = [0]
    for u in units:
        starts.append(starts[-1] + len(u) + len(sep))
    total = max(starts[-1], 1)
    slots: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths):
        slot = min(range(len(starts)), key=lambda i: abs(starts[i] / total - depth))
        slots.setdefault(slot, []).append(needle)
    out: list[str] = []
    for i in range(len(units) + 1):
        out.extend(slots.get(i, []))
        if i < len(units):
            out.append(units[i])
    return sep.join(out)


def noise(n: int) -> list[str]:
    return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]


def prose_words(rng: random.Random, n: int) -> list[str]:
    """`n` consecutive words of real documentation prose, from a seed-chosen paragraph on."""
    paras = corpus.paragraphs()
    start = rng.randrange(len(paras))
    words: list[str] = []
    i = start
    while len(words) < n:
        words.extend(paras[i % len(paras)].split())
        i += 1
    return words[:n]


def sentence_units(words: list[str]) -> list[str]:
    """Group words into sentences, so needles land between sentences, never inside one."""
    units, current = [], []
    for w in words:
        current.append(w)
        if w.endswith((".", "?", "!")):
            units.append(" ".join(current))
            current = []
    if current:
        units.append(" ".join(current))
    return units


def magic_key(rng: random.Random) -> str:
    vocab = corpus.words()
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


def magic_value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def single_question(key: str) -> tuple[str, str]:
    return (
        f"What is the special magic number for {key} mentioned in the provided text?",
        f"The special magic number for {key} mentioned in the provided text is",
    )


# --- tasks -----------------------------------------------------------------------------------


def niah_single(rng: random.Random, units: int, length: int) -> Case:
    key, value, depth = magic_key(rng), magic_value(rng), rng.random()
    q, prefix = single_question(key)
    n = needle(key, value)
    context = NIAH_INTRO + "\n" + plant(noise(units), [n], [depth])
    return Case("niah_single", context, q, prefix, [value], max_new_tokens=16, needles=[n], depths=[depth])


def distinct_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = magic_key(rng)
        if k not in keys:
            keys.append(k)
    return keys


def planted(rng: random.Random, units: int, keys: list[str], values: list[str]) -> tuple[str, list[str], list[float]]:
    """(context, needles, depths): one needle per (key, value) at a random depth in noise."""
    depths = [rng.random() for _ in values]
    needles = [needle(k, v) for k, v in zip(keys, values)]
    return NIAH_INTRO + "\n" + plant(noise(units), needles, depths), needles, depths


def niah_multikey(rng: random.Random, units: int, length: int, distractors: int = 3) -> Case:
    keys = distinct_keys(rng, distractors + 1)
    values = [magic_value(rng) for _ in keys]
    context, needles, depths = planted(rng, units, keys, values)
    q, prefix = single_question(keys[0])
    keyed = list(zip(keys, values))
    return Case("niah_multikey", context, q, prefix, [values[0]], max_new_tokens=16, needles=needles, depths=depths, keyed=keyed)


def all_numbers_case(task: str, subject: str, context: str, values: list[str], needles: list[str], depths: list[float]) -> Case:
    """A case asking for every magic number of `subject` (one key, or a list of keys)."""
    return Case(
        task,
        context,
        f"What are all the special magic numbers for {subject} mentioned in the provided text?",
        f"The special magic numbers for {subject} mentioned in the provided text are",
        values,
        max_new_tokens=48,
        needles=needles,
        depths=depths,
    )


def niah_multivalue(rng: random.Random, units: int, length: int, values: int = 4) -> Case:
    key = magic_key(rng)
    vals = list(dict.fromkeys(magic_value(rng) for _ in range(values)))
    context, needles, depths = planted(rng, units, [key] * len(vals), vals)
    return all_numbers_case("niah_multivalue", key, context, vals, needles, depths)


def niah_multiquery(rng: random.Random, units: int, length: int, queries: int = 4) -> Case:
    keys = distinct_keys(rng, queries)
    vals = [magic_value(rng) for _ in keys]
    context, needles, depths = planted(rng, units, keys, vals)
    listed = ", ".join(keys[:-1]) + f", and {keys[-1]}"
    case = all_numbers_case("niah_multiquery", listed, context, vals, needles, depths)
    case.keyed = list(zip(keys, vals))
    return case


def followups(case: Case, n: int) -> list[Case]:
    """`n` cases on `case`'s context, question i asking for the value of keyed needle i (the
    first is `case` itself when it asks for one key). For --questions-per-context."""
    if n == 1:
        return [case]
    if len(case.keyed) < n:
        with_keys = "niah_multikey and niah_multiquery (4 keys each)"
        raise ValueError(
            f"task {case.task!r} has {max(1, len(case.keyed))} question(s) per context, --questions-per-context "
            f"asks {n}; tasks with several: {with_keys}"
        )
    out = []
    for key, value in case.keyed[:n]:
        q, prefix = single_question(key)
        out.append(Case(case.task, case.context, q, prefix, [value], max_new_tokens=16, needles=case.needles, depths=case.depths, keyed=case.keyed))
    return out


def vt(rng: random.Random, units: int, length: int, hops: int = 4) -> Case:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)  # in order, so each hop follows the one it reads
    context = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        + plant(noise(units), chain, depths)
    )
    return Case(
        "vt",
        context,
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
        f"are assigned the value {value}, they are:",
        names,
        max_new_tokens=32,
        needles=chain,
        depths=depths,
    )


def cwe(rng: random.Random, units: int, length: int, common: int = 10, rare_freq: int = 2) -> Case:
    # Common words repeat more in longer lists (4 at 512 tokens, 14 at 2048, at most 30) so short
    # prompts fit and long ones keep a clear margin; `units` rare words fill the rest.
    common_freq = min(30, 4 + max(0, length - 512) // 150)
    vocab = list(corpus.words())
    rng.shuffle(vocab)
    frequent, rare = vocab[:common], vocab[common : common + units]
    items = frequent * common_freq + rare * rare_freq
    rng.shuffle(items)
    context = "Below is a numbered list of words. In these words, some appear more often than others.\n" + "\n".join(
        f"{i + 1}. {w}" for i, w in enumerate(items)
    )
    return Case(
        "cwe",
        context,
        f"Question: What are the {common} most common words in the above list?",
        f"Answer: The top {common} words that appear most often in the list are:",
        frequent,
        max_new_tokens=64,
    )


def niah_prose(rng: random.Random, units: int, length: int) -> Case:
    key, value, depth = magic_key(rng), magic_value(rng), rng.random()
    q, prefix = single_question(key)
    n = needle(key, value)
    sentences = sentence_units(prose_words(random.Random(rng.random()), units))
    context = NIAH_INTRO + "\n" + plant(sentences, [n], [depth])
    return Case("niah_prose", context, q, prefix, [value], max_new_tokens=16, needles=[n], depths=[depth])


TASKS: dict[str, Builder] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "niah_prose": niah_prose,
}


def prompt_length(tokenizer: PreTrainedTokenizerBase, case: Case, chat: bool) -> int:
    return len(build_prompt(tokenizer, case.context, case.question, chat, case.answer_prefix).ids)


def make_case(
    tokenizer: PreTrainedTokenizerBase, task: str, length: int, seed: int, chat: bool = True, max_length: int = 0
) -> Case:
    """The case of `task` for `seed` whose final prompt is as close to `length` tokens as its filler allows."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if max_length and length > max_length:
        raise ValueError(f"--length {length} exceeds the model's context of {max_length} tokens; use at most {max_length}")
    build = TASKS[task]

    def size(units: int) -> tuple[Case, int]:
        case = build(random.Random(f"{task}:{seed}"), units, length)
        return case, prompt_length(tokenizer, case, chat)

    _, base = size(1)
    if base > length:
        raise ValueError(f"--length {length} is too short for task {task!r}: its smallest prompt is {base} tokens")
    _, probe = size(101)
    per_unit = max((probe - base) / 100, 1e-3)
    units = max(1, int((length - base) / per_unit))
    case, n = size(units)
    # Step to the largest filler that fits: a few tokenizations at most.
    while n > length and units > 1:
        units -= 1
        case, n = size(units)
    while True:
        bigger, m = size(units + 1)
        if m > length:
            return case
        units, case, n = units + 1, bigger, m


# What a task file may set for all its cases (a line without "context") or per case.
CASE_OPTIONS = {"answer_prefix": str, "max_new_tokens": int, "match": str}
FILE_DEFAULTS = {"answer_prefix": "", "max_new_tokens": 64, "match": "any"}
MATCHES = ("any", "all")  # full credit when one answer is found; credit per answer found


def case_options(obj: dict, where: str, defaults: dict[str, object]) -> dict[str, object]:
    """The options of one line over `defaults`, each checked: a clear error names the bad one."""
    out = dict(defaults)
    for name, kind in CASE_OPTIONS.items():
        if name not in obj:
            continue
        value = obj[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {name!r} must be a {kind.__name__}, got {value!r}")
        if name == "max_new_tokens" and not 1 <= value <= 4096:
            raise ValueError(f"{where}: max_new_tokens={value} is outside the allowed range [1, 4096]")
        if name == "match" and value not in MATCHES:
            raise ValueError(f"{where}: match={value!r} is not one of {', '.join(MATCHES)}")
        out[name] = value
    return out


def case_line(case: Case) -> str:
    """One line of a task file holding `case` (what `load_task_file` reads back)."""
    return json.dumps({
        "context": case.context, "question": case.question, "answers": case.answers,
        "answer_prefix": case.answer_prefix, "max_new_tokens": case.max_new_tokens, "match": case.match,
    })  # fmt: skip


def load_task_file(path: str | Path) -> list[Case]:
    """Cases from a JSON-lines file: one object per line with `context`, `question`, `answers`,
    and optionally `answer_prefix` (appended after the question, as RULER's cases carry it),
    `max_new_tokens` and `match` ("any", the default, or "all": credit per answer found). A line
    without `context` sets those for the cases after it."""
    path = Path(path)
    cases = []
    defaults: dict[str, object] = dict(FILE_DEFAULTS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --task-file {str(path)!r}: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and "context" not in obj and set(obj) <= set(CASE_OPTIONS):
                defaults = case_options(obj, where, defaults)
                continue
            context, question, answers = obj["context"], obj["question"], obj["answers"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: each line must be a JSON object with 'context', 'question' and 'answers' ({err})"
            ) from err
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}:{number}: 'answers' must be a non-empty list of strings")
        options = case_options(obj, where, defaults)
        cases.append(
            Case(
                path.stem, str(context), str(question), str(options["answer_prefix"]), answers, match=str(options["match"]),
                max_new_tokens=int(options["max_new_tokens"]),  # type: ignore[arg-type]
            )  # fmt: skip
        )
    if not cases:
        raise ValueError(f"--task-file {str(path)!r} holds no cases")
    return cases
