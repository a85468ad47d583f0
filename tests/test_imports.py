"""The floors import downward only: memory (who owns K/V) imports nothing else of kvforge; reading
(attention math and kernels) imports neither the layouts, the cache nor the attention function;
the layouts (storage) read themselves through `kvforge.reading` alone, never through
`kvforge.attention` or a kernel module directly. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvforge

PACKAGE = Path(kvforge.__file__).parent


def kvforge_imports(path: Path) -> set[str]:
    """Every kvforge module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "kvforge"}


def modules(folder: str) -> list[Path]:
    found = sorted((PACKAGE / folder).rglob("*.py"))
    assert found, f"no modules under {folder}"
    return found


def offending(folder: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in modules(folder):
        wrong = sorted(n for n in kvforge_imports(path) if not n.startswith(allowed))
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = wrong
    return bad


def test_memory_imports_nothing_else_of_kvforge():
    assert offending("memory", ("kvforge.memory",)) == {}


def test_reading_imports_neither_the_layouts_the_cache_nor_the_attention_function():
    assert offending("reading", ("kvforge.reading",)) == {}


@pytest.mark.parametrize("path", modules("storage"), ids=lambda p: p.name)
def test_a_layout_reads_through_kvforge_reading_only(path):
    imported = kvforge_imports(path)
    assert not {n for n in imported if n.startswith(("kvforge.attention", "kvforge.kernels", "kvforge.cache"))}
    # Only what the package exports: no layout reaches into a kernel module or the dense math's file.
    assert not {n for n in imported if n.startswith("kvforge.reading.")} - {f"kvforge.reading.{name}" for name in dir_reading()}


def dir_reading() -> list[str]:
    import kvforge.reading

    return list(kvforge.reading.__all__)


def test_a_kv_spec_is_validated_when_made_and_builds_its_policy():
    from kvforge import KVSpec, QuantSpec

    spec = KVSpec("snapkv", 0.5, QuantSpec("int4"), params=(("window", 8),))
    policy = spec.build()
    assert (policy.name, policy.ratio, policy.window) == ("snapkv", 0.5, 8)
    assert spec.key == ("snapkv[window=8]", 0.5, "int4") and hash(spec) == hash(KVSpec("snapkv", 0.5, QuantSpec("int4"), params=(("window", 8),)))
    assert KVSpec("knorm", budget=64).build().budget == 64
    for bad, message in [
        (dict(ratio=1.0), r"ratio 1.0 is outside the allowed range \[0, 1\)"),
        (dict(ratio=float("nan")), "ratio nan is outside"),
        (dict(budget=0), "budget 0 must be a whole number"),
        (dict(ratio=0.5, budget=8), "either a ratio"),
    ]:
        with pytest.raises(ValueError, match=message):
            KVSpec("knorm", **bad)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        KVSpec("nope", 0.5).build()
