"""Prefix-affine routing as bookkeeping (`kvforge.server.replicas.routing`), and replicas' metrics
combined into one server's (`kvforge.server.metrics.combine`): exact answers, no Ray."""

from __future__ import annotations

from kvforge.server.metrics import Metric, combine, render
from kvforge.server.replicas.routing import MIN_SHARED, ROUTE_BLOCK, ROUTE_BLOCKS, SPILL, AffinityTable, choose, route_of


def test_a_route_is_one_hash_per_full_block_chained_over_the_prefix():
    a, b = list(range(100)), list(range(40)) + [7] * 60
    ra, rb = route_of(a), route_of(b)
    assert len(ra) == 100 // ROUTE_BLOCK == 6 and len(rb) == 6
    assert ra[:2] == rb[:2] and ra[2] != rb[2]  # equal up to token 32, different from block 2 (tokens 32-47) on
    assert route_of(list(range(ROUTE_BLOCK - 1))) == []
    assert len(route_of(list(range(ROUTE_BLOCK * (ROUTE_BLOCKS + 3))))) == ROUTE_BLOCKS


def test_the_table_finds_the_deepest_block_a_replica_was_sent():
    table = AffinityTable()
    table.record([1, 2, 3, 4], "a")
    table.record([1, 2, 9], "b")
    assert table.deepest([1, 2, 3, 4, 5], {"a", "b"}) == (4, {"a"})
    assert table.deepest([1, 2, 8], {"a", "b"}) == (2, {"a", "b"})
    assert table.deepest([1, 2, 9], {"a"}) == (2, {"a"})  # only among the replicas asked about
    assert table.deepest([7], {"a", "b"}) == (0, set())
    table.forget("a")
    assert table.deepest([1, 2, 3, 4], {"a", "b"}) == (2, {"b"}) and 3 not in table.holders


def test_the_table_forgets_the_oldest_blocks_beyond_its_capacity():
    table = AffinityTable(capacity=3)
    table.record([1, 2], "a")
    table.record([3], "b")
    table.record([1], "b")  # block 1 used again: block 2 is now the oldest
    table.record([4], "a")
    assert list(table.holders) == [3, 1, 4] and table.holders[1] == {"a", "b"}


def test_a_prompt_goes_to_the_replica_holding_its_prefix_unless_that_one_is_far_busier():
    table = AffinityTable()
    document = list(range(100, 110))
    table.record(document, "r1")
    queued = {"r0": 0, "r1": 2, "r2": 1}
    assert choose(table, [*document, 55, 56], queued) == [["r1"], ["r0", "r2", "r1"]]
    assert choose(table, [*document, 55], {"r0": 0, "r1": SPILL, "r2": 0}) == [["r1"], ["r0", "r2", "r1"]]
    assert choose(table, [*document, 55], {"r0": 0, "r1": SPILL + 1, "r2": 0}) == [["r0", "r2", "r1"]]  # spilled


def test_a_prompt_sharing_little_or_nothing_goes_to_the_least_busy_replica():
    table = AffinityTable()
    table.record([1, 2, 3, 4], "r0")
    queued = {"r0": 3, "r1": 1}
    shared = int(MIN_SHARED * 8) - 1  # one block short of affine among 8
    assert choose(table, [1, 2, 3, 4][:shared] + list(range(50, 58 - shared)), queued) == [["r1", "r0"]]
    assert choose(table, [1, 2, 3, 4, 5, 6, 7, 8], queued) == [["r0"], ["r1", "r0"]]  # 4 of 8: affine
    assert choose(table, [], queued) == [["r1", "r0"]]  # shorter than a block
    assert choose(table, [9], {"r0": 0, "r1": 0}) == [["r0", "r1"]]  # ties: by name


def test_replicas_metrics_are_summed_then_labelled_per_replica():
    def replica(hits: int, tier_reads: int, block: int) -> list[Metric]:
        return [
            Metric("prefix_hits_total", "counter", "hits", {(): hits}),
            Metric("store_tier_hits_total", "counter", "tier hits", {(("tier", "disk"),): tier_reads}),
            Metric("kv_block_size", "gauge", "entries per block", {(): block}),
        ]

    combined = {m.name: m.samples for m in combine({"a": replica(3, 1, 32), "b": replica(4, 5, 32)})}
    assert combined["prefix_hits_total"] == {(): 7, (("replica", "a"),): 3, (("replica", "b"),): 4}
    assert combined["store_tier_hits_total"] == {(("tier", "disk"),): 6, (("tier", "disk"), ("replica", "a")): 1, (("tier", "disk"), ("replica", "b")): 5}
    assert combined["kv_block_size"][()] == 32  # the same on each: not summed
    text = render(combine({"a": replica(3, 1, 32)}))
    assert 'kvforge_prefix_hits_total 3\nkvforge_prefix_hits_total{replica="a"} 3\n' in text
    assert 'kvforge_store_tier_hits_total{tier="disk",replica="a"} 1' in text
