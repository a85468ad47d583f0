"""How a KV setting is written: policy names with parameters, and their round trip."""

from __future__ import annotations

import pytest

from kvforge.policies.names import name_of, parse_name, split_top
from kvforge.spec import KVSpec
from kvforge.storage import QuantSpec


def test_a_name_with_parameters_round_trips():
    assert parse_name("smooth:kvzap[pool=max,kernel=5]") == ("smooth:kvzap", (("kernel", 5), ("pool", "max")))
    assert parse_name("knorm") == ("knorm", ())
    assert name_of("smooth:kvzap", (("pool", "max"), ("kernel", 5))) == "smooth:kvzap[kernel=5,pool=max]"
    for text in ("snapkv[window=4]", 'snapkv[pooling="5"]', "x[a=[1,2],b=true,c=0.5]", "knorm"):
        assert name_of(*parse_name(text)) == text
    spec = KVSpec.named("smooth:snapkv[kernel=5]", 0.5, QuantSpec("int4", group=16))
    assert (spec.policy, spec.params, spec.key) == ("smooth:snapkv", (("kernel", 5),), ("smooth:snapkv[kernel=5]", 0.5, "int4/g16"))
    assert spec.build().kernel == 5
    # A built policy writes itself back the same way (bench's and fidelity's rows), defaults left out.
    assert spec.build().written_name == "smooth:snapkv[kernel=5]"
    assert KVSpec.named("adakv:snapkv[window=8]", 0.5).build().written_name == "adakv:snapkv[window=8]"
    assert KVSpec.named("smooth:snapkv", 0.5).build().written_name == "smooth:snapkv"
    # A parameter at its default names nothing: one setting, one name, in eval's rows and bench's.
    assert KVSpec.named("snapkv[window=64]", 0.5) == KVSpec.named("snapkv", 0.5) and KVSpec.named("snapkv[window=64]").name == "snapkv"


def test_lists_split_outside_brackets_and_quotes_only():
    assert split_top("full, kvzap,smooth:kvzap[kernel=5,pool=max],x[a=[1,2]]") == [
        "full", "kvzap", "smooth:kvzap[kernel=5,pool=max]", "x[a=[1,2]]"
    ]
    assert split_top('a[x="]"],b[s="c,d"]') == ['a[x="]"]', 'b[s="c,d"]']
    assert name_of(*parse_name('p[s="a,b"]')) == 'p[s="a,b"]'
    assert parse_name("x[a=[1,2]]") == ("x", (("a", [1, 2]),))
    assert hash(KVSpec("knorm", params=(("decode_budget", 8), ("layers", [1, 2]))))  # a list is held as a tuple


def test_flags_and_brackets_give_one_setting_one_key():
    from kvforge.cli.common import cli_spec

    flags = cli_spec("smooth:snapkv", 0.5, ["window=4", "kernel=3"])
    assert flags == KVSpec.named("smooth:snapkv[window=4,kernel=3]", 0.5) and hash(flags) == hash(KVSpec.named("smooth:snapkv[kernel=3,window=4]", 0.5))


@pytest.mark.parametrize(
    "text, message",
    [
        ("snapkv[window=4", "write parameters after the name in brackets"),
        ("[window=4]", "write parameters after the name in brackets"),
        ("snapkv[window]", "parameter 'window' must look like NAME=VALUE"),
        ("snapkv[window=4,window=5]", "gives parameter 'window' twice"),
    ],
)
def test_a_malformed_name_says_what_to_write(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_name(text)


def test_a_bracketed_policy_field_is_refused():
    with pytest.raises(ValueError, match="give its parameters as `params`"):
        KVSpec("snapkv[window=4]")
    with pytest.raises(ValueError, match="give its ratio as the setting's own"):
        KVSpec.named("snapkv[ratio=0.5]")
    with pytest.raises(ValueError, match="has no parameter 'windw'"):
        KVSpec.named("snapkv[windw=4]").build()
