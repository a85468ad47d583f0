"""How a policy with parameters is written: `smooth:kvzap[kernel=5,pool=max]`.

`parse_name` reads it (the CLI's --policy / --policies, eval's rows), `name_of` writes it
(parameters in name order, so one setting has one name), `split_top` splits a comma list
without cutting a policy's brackets.
"""

from __future__ import annotations

import json
from typing import Any

Params = tuple[tuple[str, Any], ...]


def parse_value(raw: str) -> Any:
    """A parameter's value: JSON where it parses (5, 0.5, true, [1, 2], "x"), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at each `sep` outside brackets and double quotes, parts stripped, empty parts
    dropped: 'a,b[x=1,y="2,3"],c' -> ['a', 'b[x=1,y="2,3"]', 'c']."""
    parts, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(text):
        quoted ^= ch == '"'
        depth += 0 if quoted else {"[": 1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0 and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_name(text: str) -> tuple[str, Params]:
    """'smooth:kvzap[kernel=5,pool=max]' -> ('smooth:kvzap', (('kernel', 5), ('pool', 'max'))):
    a policy name and its parameters, in name order (ValueError naming what is malformed)."""
    text = text.strip()
    if "[" not in text:
        return text, ()
    head, _, rest = text.partition("[")
    if not rest.endswith("]") or not head.strip():
        raise ValueError(f"policy {text!r}: write parameters after the name in brackets, e.g. smooth:kvzap[kernel=5,pool=max]")
    params: dict[str, Any] = {}
    for item in split_top(rest[:-1]):
        name, eq, raw = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"policy {text!r}: parameter {item!r} must look like NAME=VALUE, e.g. {head}[kernel=5]")
        if name.strip() in params:
            raise ValueError(f"policy {text!r} gives parameter {name.strip()!r} twice")
        params[name.strip()] = parse_value(raw.strip())
    return head.strip(), tuple(sorted(params.items()))


def name_of(policy: str, params: Params) -> str:
    """The inverse of `parse_name`: how reports and eval rows name a policy with parameters."""
    if not params:
        return policy

    def shown(value: Any) -> str:
        bare = isinstance(value, str) and parse_value(value) == value and not set(value) & set(",[]=")
        return value if bare else json.dumps(value, separators=(",", ":"))  # bare: pool=max reads back as itself

    return f"{policy}[{','.join(f'{k}={shown(v)}' for k, v in sorted(params))}]"
