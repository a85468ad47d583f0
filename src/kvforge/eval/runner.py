"""Run every (task, sample, setting, policy, ratio) and append one JSON line per result.

One full prefill per sample and setting serves every (policy, ratio): compression happens after
each layer's attention, so the prefill does not depend on the policy and each compressed cache is
derived from the recorded full prefill exactly (`KVCache.derive`). Results are appended whole,
one line at a time, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

import torch

from kvforge.cache import KVCache, head_dim
from kvforge.eval.likelihood import answer_ids, answer_logprobs
from kvforge.eval.tasks import TASKS, Case, followups, load_task_file, make_case, score
from kvforge.generate import Prompt, build_prompt, check_length, feed, greedy, prefill, settle, stop_ids
from kvforge.models import LoadedModel
from kvforge.policies import check_policy_name
from kvforge.policies.registry import check_parameters
from kvforge.policies.base import Policy
from kvforge.policies.names import parse_name
from kvforge.spec import KVSpec
from kvforge.storage import QuantSpec

log = logging.getLogger(__name__)

ROWS, CONFIG, SUMMARY = "rows.jsonl", "config.json", "summary.json"
# Fields a later run may change in the same --out: rows are per sample, policy, ratio and quant
# (a quant label names its group where it is not the codec's default: `int4/g16`).
EXTENSIBLE = ("samples", "tasks", "policies", "ratios", "quant", "quant_group")
# Fields added after runs were written: a stored configuration without them had these values.
ADDED = {"group_labels": False, "questions": 1, "quant_group": 32, "quant_residual": 128, "quant_split": 0.25, "dtype": "float32", "quant_prompt_residual": True}


@dataclass
class EvalConfig:
    model: str
    tasks: list[str]
    policies: list[str]
    ratios: list[float]
    length: int
    samples: int
    settings: list[bool] = field(default_factory=lambda: [False])  # query_aware values to run
    seed: int = 0
    task_file: str | None = None
    prefill_chunk: int | None = None  # None: one-shot prefill, every policy derived from it
    questions: int = 1  # questions answered from each compressed context (each on a fork of it)
    quant: list[str] = field(default_factory=lambda: ["none"])  # how entries are held: each mode a set of rows
    quant_group: int = 32
    quant_residual: int = 0  # (128 before: ADDED keeps what older directories ran with)
    quant_split: float = 0.25  # mixed: the fraction of entries held in int4
    quant_prompt_residual: bool = False  # the compressed prompt's last entries in full precision too
    dtype: str = "float32"  # the model's (scores depend on it; the device does not change them beyond rounding)
    # Samples decoded together. An execution detail: not part of the configuration's identity.
    batch: int = field(default=8, compare=False)

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(TASKS)}")
        for name in self.policies:
            policy, params = parse_name(name)
            check_policy_name(policy)
            check_parameters(policy, [k for k, _ in params], written=name)
        if self.batch < 1:
            raise ValueError(f"--batch {self.batch} must be at least 1")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk {self.prefill_chunk} must be at least 1 (or left out for one-shot prefill)")
        if self.samples < 1:
            raise ValueError(f"--samples {self.samples} must be at least 1")
        self.specs()
        for r in self.ratios:
            if not 0 <= r < 1:
                raise ValueError(f"ratio {r} is outside [0, 1): 0 keeps all, 0.75 keeps a quarter")
        if not self.tasks and not self.task_file:
            raise ValueError("no task given: name --tasks or a --task-file")
        if not 1 <= self.questions <= 4:
            raise ValueError(f"--questions-per-context {self.questions} is outside the allowed range [1, 4]")
        if self.questions > 1:
            if any(self.settings):
                raise ValueError("--questions-per-context needs the question-agnostic setting (the question is not compressed)")
            if self.task_file or any(t not in ("niah_multikey", "niah_multiquery") for t in self.tasks):
                raise ValueError(
                    f"--questions-per-context {self.questions} needs tasks with several keyed needles: "
                    f"niah_multikey, niah_multiquery (got {', '.join(self.tasks) or self.task_file})"
                )

    def specs(self) -> dict[str, QuantSpec]:
        """Each quantization mode of the run, validated (a bad value names its option)."""
        options = dict(group=self.quant_group, residual=self.quant_residual, split=self.quant_split, prompt_residual=self.quant_prompt_residual)
        return {label: QuantSpec.parse(label, **options) for label in self.quant}

    def combos(self) -> list[KVSpec]:
        """The KV settings of one sample's rows: `full` once per quant mode, every other policy at
        every ratio and quant mode (ratio 0 too: it keeps every entry, and `--quant mixed` holds
        them by the policy's score, as MiKV does instead of evicting)."""
        pairs = [("full", 0.0)] if "full" in self.policies else []
        pairs += [(p, r) for p in self.policies if p != "full" for r in self.ratios]
        specs = self.specs()
        combos = (KVSpec.named(p, r, specs[q]) for q in self.quant for p, r in pairs)
        return list({c.key: c for c in combos}.values())  # int4 and int4/g32 are one setting (equal specs)


@dataclass
class EvalRow:
    task: str
    sample: int
    query_aware: bool
    policy: str
    ratio: float
    prompt_hash: str
    prompt_tokens: int
    answer: str
    answers: list[str]
    score: float
    cache_bytes: int  # K/V held at the end of generation
    dense_bytes: int  # K/V an uncompressed cache holds for the same tokens
    prefill_seconds: float  # the sample's one full prefill (shared by its rows)
    compress_seconds: float
    decode_seconds: float
    generated_tokens: int
    batch: int = 1  # sequences decoded together; seconds above are per sequence
    question: int = 0  # which question of the context (--questions-per-context)
    quant: str = "none"  # how the entries were held
    bits_per_element: float | None = None  # effective, everything included (None: rows from before quantization)
    read_fraction: float | None = None  # of the entries held, what each decoding step read (None: all; --quant .../quest)
    # The reference answers' mean log-probability per token after the prompt (`likelihood.py`);
    # None: rows from before it was measured.
    answer_logprob: float | None = None

    @property
    def key(self) -> tuple[str, int, bool, str, float, str, int]:
        return (self.task, self.sample, self.query_aware, self.policy, self.ratio, self.quant, self.question)


@dataclass
class SweepStats:
    seconds: float = 0.0
    prefills: int = 0
    prefill_seconds: float = 0.0
    rows: int = 0
    per_row_prefill_seconds: float | None = None  # one policy prefilled on its own, measured once
    per_row_prefill_policy: str | None = None


def read_rows(path: Path) -> list[EvalRow]:
    """Rows already written; a torn last line (an interrupted write) is cut off the file."""
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with path.open("rb") as f:
        for raw in f:
            try:
                rows.append(EvalRow(**json.loads(raw)))
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                log.warning("dropping an incomplete line at the end of %s", path)
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return rows


def append_row(path: Path, row: EvalRow) -> None:
    # One write of one whole line, flushed to disk before the next row starts.
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def lock_out(out: Path) -> IO[str]:
    """Hold an exclusive lock on `out` for this process: two runs never write one directory."""
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another kvforge eval is writing to {out}; wait for it or use another --out") from None
    return handle


def prepare_out(out: Path, cfg: EvalConfig, force: bool) -> list[EvalRow]:
    """Create or reopen `out`; refuse to mix results of another configuration unless `force`.

    Samples, tasks, policies, ratios and quant modes are not part of a configuration: rows are per
    (task, sample, policy, ratio, quant), so a run asking for more extends the directory and one
    asking for fewer reports only its own rows."""
    out.mkdir(parents=True, exist_ok=True)
    identity = {k: v for k, v in asdict(cfg).items() if k != "batch"}

    def same(stored: dict) -> bool:
        ignored = {*EXTENSIBLE, "group_labels"}
        for config in (stored, identity):  # a side that quantized (or mixed) nothing does not care how
            modes = {QuantSpec.parse(label).mode for label in config.get("quant", ["none"])}
            if modes == {"none"}:
                ignored |= {"quant_group", "quant_residual", "quant_prompt_residual"}
            if "mixed" not in modes:
                ignored.add("quant_split")
        return {k: v for k, v in stored.items() if k not in ignored} == {k: v for k, v in identity.items() if k not in ignored}

    # group_labels: every row's quant label names its group (`name_groups` ran or was not needed).
    wanted = json.dumps({**identity, "group_labels": True}, indent=2, sort_keys=True)
    config = out / CONFIG
    stored = {**ADDED, **json.loads(config.read_text())} if config.exists() else None
    if stored is not None and not same(stored):
        if not force:
            raise ValueError(
                f"{out} holds results of a different configuration ({config}); "
                f"use another --out, or --force to discard them"
            )
        for name in os.listdir(out):
            if name == ".lock":
                continue
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif stored is not None and not stored["group_labels"]:
        name_groups(out / ROWS, stored["quant_group"])
    write_atomic(config, wanted.encode())
    return read_rows(out / ROWS)


def name_groups(path: Path, group: int) -> None:
    """Rows written before quant labels named their group (`int4` for `--quant-group 16`) are
    renamed once, from the group of the directory's stored configuration (`int4/g16`), so rows
    of any group can share a directory afterwards. The file is rewritten whole, atomically."""
    rows = read_rows(path)
    renamed = [replace(r, quant=QuantSpec.parse(r.quant, group=group).label) for r in rows]
    if renamed != rows:
        log.info("%s: quant labels now name their group %d", path, group)
        write_atomic(path, "".join(json.dumps(asdict(r)) + "\n" for r in renamed).encode())


def own_rows(rows: list[EvalRow], cfg: EvalConfig) -> list[EvalRow]:
    """The rows `cfg` asks for (a directory may hold more, from runs that asked for more)."""
    combos = {c.key for c in cfg.combos()}
    # A task-file case carries its own task name; only the generated tasks are chosen by --tasks.
    return [
        r
        for r in rows
        if r.sample < cfg.samples and (r.policy, r.ratio, r.quant) in combos and (r.task in cfg.tasks or r.task not in TASKS)
    ]


def groups(loaded: LoadedModel, cfg: EvalConfig) -> Iterator[list[tuple[int, Case]]]:
    """Lists of (sample index, case) of one task, up to `cfg.batch` samples each, group-major
    across tasks so an interrupted run has covered every task about equally."""
    chat = loaded.is_instruct
    file_cases = load_task_file(cfg.task_file)[: cfg.samples] if cfg.task_file else []
    for start in range(0, cfg.samples, cfg.batch):
        samples = range(start, min(start + cfg.batch, cfg.samples))
        for task in cfg.tasks:
            yield [
                (s, make_case(loaded.tokenizer, task, cfg.length, seed=cfg.seed * 1_000_003 + s, chat=chat, max_length=loaded.context_length))
                for s in samples
            ]
        if file_cases[start : start + cfg.batch]:
            yield [(s, file_cases[s]) for s in samples if s < len(file_cases)]


def total_rows(cfg: EvalConfig) -> int:
    per_sample = len(cfg.combos()) * len(cfg.settings) * cfg.questions
    file_cases = len(load_task_file(cfg.task_file)[: cfg.samples]) if cfg.task_file else 0
    return per_sample * (len(cfg.tasks) * cfg.samples + file_cases)


def policy_key(kv: KVSpec) -> KVSpec:
    """The setting at full precision: its quantized forms share its policy."""
    return replace(kv, quant=QuantSpec())


def built(combos: list[KVSpec]) -> dict[KVSpec, Policy]:
    """Each setting's policy, built once per `policy_key`."""
    return {policy_key(kv): policy_key(kv).build() for kv in combos}


@torch.inference_mode()
def run_group(
    loaded: LoadedModel,
    group: list[tuple[int, Case]],
    query_aware: bool,
    combos: list[KVSpec],
    policies: dict[KVSpec, Policy],
    stats: SweepStats,
    prefill_chunk: int | None = None,
    questions: int = 1,
) -> Iterator[EvalRow]:
    """Prefill each case once with a full recording cache, stack them into one batch, then derive
    and answer every (policy, ratio) for the whole batch. With `prefill_chunk`, every (policy,
    ratio) prefills each case itself, chunk by chunk, compressing as it goes.

    Prefills run one prompt at a time (the fast causal path, one prompt's memory); derivation and
    decoding run batched. Per-row seconds are the batch's seconds divided by its size; prefill
    seconds are each prompt's own. With `questions` > 1 each compressed context answers that
    many questions (`followups`), each on its own fork of the compressed cache. `policies` holds
    each setting's policy, keyed by the setting at full precision (`policy_key`): quantized caches
    are derived from the same full-precision prefill."""
    model, tok = loaded.model, loaded.tokenizer
    every = [followups(c, questions) for _, c in group]  # per sample, its questions' cases
    asked = [[(s, cases[q]) for (s, _), cases in zip(group, every)] for q in range(questions)]
    per_question = [[build_prompt(tok, c.context, c.question, loaded.is_instruct, c.answer_prefix) for _, c in g] for g in asked]
    prompts = per_question[0]
    max_new = max(c.max_new_tokens for g in asked for _, c in g)
    for prompt in (p for ps in per_question for p in ps):
        check_length(len(prompt.ids), max_new, loaded.context_length)
    compressed = [p.ids if query_aware else p.context_ids for p in prompts]
    size = len(group)

    def prefill_each(
        policy: Policy, record: bool, chunk: int | None, quant: QuantSpec | None = None
    ) -> tuple[KVCache, torch.Tensor, list[float], float]:
        """Prefill every prompt alone with `policy`, then stack them into one batch; also the
        seconds the policy spent compressing during those prefills."""
        caches, firsts, seconds = [], [], []
        for ids in compressed:
            cache = KVCache(model, policy, record_prefill=record, tokenizer=tok, quant=quant)
            start = time.perf_counter()
            firsts.append(prefill(model, cache, ids, chunk))
            seconds.append(time.perf_counter() - start)
            caches.append(cache)
            stats.prefills += 1
            stats.prefill_seconds += seconds[-1]
        policy_seconds = sum(c.policy_seconds for c in caches)
        return KVCache.stack(caches), torch.stack(firsts), seconds, policy_seconds  # firsts: (batch, vocab)

    if prefill_chunk is None:
        stacked, first_logits, prefill_seconds, _ = prefill_each(KVSpec().build(), True, None)
        if stats.per_row_prefill_seconds is None:
            # What the sweep saves: one policy's prefill on its own, measured on one prompt.
            timed = next((c for c in combos if c.policy != "full"), combos[0])
            start = time.perf_counter()
            prefill(model, KVCache(model, policies[policy_key(timed)], tokenizer=tok), compressed[0])
            stats.per_row_prefill_seconds = time.perf_counter() - start
            stats.per_row_prefill_policy = f"{timed.name} {timed.ratio:g}"
    prefill_len = torch.tensor([len(ids) for ids in compressed], device=model.device)
    # Shared by one policy's ratios: what it observed of these prefills. Quantized modes share it
    # too (a prompt is observed before it is quantized); its form differs from full precision's.
    observed: dict[tuple[bool, int | None], dict] = {}
    for kv in combos:
        policy, spec = policies[policy_key(kv)], kv.quant
        if prefill_chunk is None and spec.rank is None:
            start = time.perf_counter()
            seen = observed.setdefault((spec.enabled, spec.rank), {})
            cache = stacked.derive(policy, seen, spec)
            # Policies that compress after extra passes; passes shared by this policy's ratios are
            # charged to each of them, as each would pay them alone.
            shared = settle(model, cache, compressed, prefill_len, seen)
            compress_seconds = (time.perf_counter() - start + shared) / size
            logits, seconds = first_logits, prefill_seconds
        else:
            # A chunked prefill depends on the policy (later chunks attend over what was kept),
            # and a low-rank cache attends its own prompt in coordinates: each (policy, ratio)
            # prefills every prompt itself.
            cache, logits, seconds, policy_seconds = prefill_each(policy, False, prefill_chunk, spec)
            compress_seconds = policy_seconds / size
        for question, (asked_q, prompts_q) in enumerate(zip(asked, per_question)):
            # With several questions each answers on a fork: the compressed cache stays as it was.
            answering = cache if questions == 1 else cache.fork()
            yield from answer_group(
                loaded, answering, asked_q, prompts_q, query_aware, kv.key, logits, prefill_len,
                max_new, (seconds, compress_seconds), question,
            )  # fmt: skip


def answer_group(
    loaded: LoadedModel,
    cache: KVCache,
    group: list[tuple[int, Case]],
    prompts: list[Prompt],
    query_aware: bool,
    combo: tuple[str, float, str],
    logits: torch.Tensor,  # (batch, vocab) after each row's compressed part
    prefill_len: torch.Tensor,  # (batch,) rotary position after it
    max_new: int,
    seconds: tuple[list[float], float],  # per-row prefill seconds, compress seconds per row
    question: int,
) -> Iterator[EvalRow]:
    """Feed each row's question (question-agnostic), decode greedily, score: one row per sample.
    Also how likely the cache makes the reference answers (not counted in the decode seconds)."""
    model, tok = loaded.model, loaded.tokenizer
    size = len(group)
    start = time.perf_counter()
    positions = prefill_len
    if not query_aware:
        logits, positions = feed(model, cache, [p.rest_ids for p in prompts], positions)
    asked = time.perf_counter()
    logprobs = answer_logprobs(model, cache, logits, positions, [answer_ids(tok, case) for _, case in group])
    teacher_forced = time.perf_counter() - asked
    outputs = greedy(model, cache, logits, positions, max_new, stop_ids(tok))
    decode_seconds = (time.perf_counter() - start - teacher_forced) / size
    held, dense = cache.seq_nbytes().tolist(), cache.seq_dense_nbytes().tolist()
    bits = cache.seq_bits_per_element().tolist()
    read = cache.seq_read_fraction()
    for b, ((sample, case), prompt, tokens) in enumerate(zip(group, prompts, outputs)):
        tokens = tokens[: case.max_new_tokens]
        text = tok.decode(tokens, skip_special_tokens=True)
        yield EvalRow(
            task=case.task,
            sample=sample,
            query_aware=query_aware,
            policy=combo[0],
            ratio=combo[1],
            prompt_hash=hashlib.sha256(json.dumps(prompt.ids).encode()).hexdigest()[:16],
            prompt_tokens=len(prompt.ids),
            answer=text,
            answers=case.answers,
            score=score(text, case),
            cache_bytes=int(held[b]),
            dense_bytes=int(dense[b]),
            prefill_seconds=seconds[0][b],
            compress_seconds=seconds[1],
            decode_seconds=decode_seconds,
            generated_tokens=len(tokens),
            batch=size,
            question=question,
            quant=combo[2],
            bits_per_element=round(bits[b], 3),
            read_fraction=None if read is None else round(float(read[b]), 4),
            answer_logprob=None if logprobs[b] is None else round(logprobs[b], 4),
        )


@dataclass(frozen=True)
class Unit:
    """What one `run_group` call does: a sample group, in one setting, for the KV settings any of
    its samples lacks. Small and picklable: a worker rebuilds the group from the configuration."""

    group: int  # index in `groups(loaded, cfg)` order
    query_aware: bool
    combos: tuple[KVSpec, ...]


def plan(loaded: LoadedModel, cfg: EvalConfig, done: set[tuple]) -> tuple[list[list[tuple[int, Case]]], list[Unit]]:
    """Every sample group of `cfg`, and the units that make the rows `done` does not hold (a
    setting is redone for a whole group when any of its samples lacks it)."""
    combos = cfg.combos()
    all_groups = list(groups(loaded, cfg))
    units = []
    for index, group in enumerate(all_groups):
        for query_aware in cfg.settings:
            todo = tuple(
                c for c in combos
                if any((case.task, s, query_aware, *c.key, q) not in done for s, case in group for q in range(cfg.questions))
            )  # fmt: skip
            if todo:
                units.append(Unit(index, query_aware, todo))
    return all_groups, units


def run_unit(loaded: LoadedModel, cfg: EvalConfig, group: list[tuple[int, Case]], unit: Unit, policies: dict[KVSpec, Policy], stats: SweepStats) -> Iterator[EvalRow]:
    return run_group(loaded, group, unit.query_aware, list(unit.combos), policies, stats, cfg.prefill_chunk, cfg.questions)


def run_eval(
    loaded: LoadedModel,
    cfg: EvalConfig,
    out: Path,
    force: bool = False,
    on_row: Callable[[EvalRow], None] | None = None,
    workers: Workers | None = None,
) -> tuple[list[EvalRow], SweepStats]:
    """Run what `out` does not hold yet; return every row of the configuration and sweep stats.
    With `workers`, the units run on Ray actors (`distributed.py`); this process alone writes."""
    cfg.validate()
    if loaded.dtype_name != cfg.dtype:
        raise ValueError(f"the model is loaded in {loaded.dtype_name} but the eval configuration says --dtype {cfg.dtype}")
    for spec in cfg.specs().values():
        spec.check_head_dim(head_dim(loaded.model))
    lock = lock_out(out)
    try:
        return _run_locked(loaded, cfg, out, force, on_row, workers)
    finally:
        lock.close()


@dataclass
class Workers:
    """Where units run besides this process: `count` Ray actors, on a local cluster (`address`
    None) or the one at `address` ("auto", "HOST:PORT")."""

    count: int
    address: str | None = None
    device: str | None = "cpu"


def _run_locked(
    loaded: LoadedModel, cfg: EvalConfig, out: Path, force: bool, on_row: Callable[[EvalRow], None] | None, workers: Workers | None
) -> tuple[list[EvalRow], SweepStats]:
    rows = prepare_out(out, cfg, force)
    done = {r.key for r in rows}
    all_groups, units = plan(loaded, cfg, done)
    stats = SweepStats()
    start = time.perf_counter()
    if workers is None:
        policies = built(cfg.combos())
        made = (row for unit in units for row in run_unit(loaded, cfg, all_groups[unit.group], unit, policies, stats))
    else:
        from kvforge.eval.distributed import run_units

        made = run_units(cfg, units, workers, stats)
    for row in made:
        if row.key in done:  # a unit run again (a worker died) or a setting redone for its group
            continue
        done.add(row.key)
        append_row(out / ROWS, row)
        rows.append(row)
        stats.rows += 1
        if on_row is not None:
            on_row(row)
    stats.seconds = time.perf_counter() - start
    log.info("sweep: %d rows, %d prefills, %.1fs", stats.rows, stats.prefills, stats.seconds)
    return own_rows(rows, cfg), stats
