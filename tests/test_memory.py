"""The memory owner's bookkeeping, in the style of the serving engines' CPU tests: exact block
ids for allocation, release, reference counts, hash hits, copy on write of the last block and
eviction; the tensors behind them (bytes, moves, swap out and in)."""

from __future__ import annotations

import pytest
import torch

from kvforge.memory import BlockPool, BlockStore, OutOfBlocks, Row, RowBlocks
from kvforge.memory.hashing import block_hashes


def test_allocation_takes_the_oldest_freed_blocks_first():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    pool.release([1])
    assert list(pool.free_queue) == [3, 4, 5, 6, 7, 1]
    assert pool.allocate(6) == [3, 4, 5, 6, 7, 1]
    assert pool.num_free == 0 and not pool.can_allocate(1)
    with pytest.raises(OutOfBlocks, match="1 blocks asked, 0 free of 8"):
        pool.allocate(1)
    pool.check()


def test_a_shared_block_is_freed_by_its_last_reference():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.share(ids)
    assert [pool.blocks[i].ref_count for i in ids] == [2, 2] and pool.num_shared == 2
    pool.release(ids)
    assert pool.num_free == 2 and pool.num_shared == 0
    pool.release(ids)
    assert list(pool.free_queue) == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="block 0 is released more often"):
        pool.release([0])
    with pytest.raises(ValueError, match="block 0 is free"):
        pool.share([0])
    pool.check()


def test_a_marked_block_is_found_in_use_and_after_it_is_freed_until_reused():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.mark(a, 111) == a and pool.mark(b, 111) == a  # the first block standing for it stays
    assert pool.lookup(111) == a and pool.blocks[a].ref_count == 2
    pool.release([a, a, b])
    assert list(pool.free_queue) == [2, 3, 0, 1]
    assert pool.lookup(111) == a and list(pool.free_queue) == [2, 3, 1]  # revived out of the queue
    pool.release([a])
    assert pool.allocate(3) == [2, 3, 1]
    assert pool.lookup(111) == 0 and pool.num_free == 0
    pool.release([0])
    assert pool.allocate(1) == [0]  # now reused: it forgets the hash
    assert pool.lookup(111) is None and pool.blocks[0].hash is None
    pool.check()


def test_appending_fills_the_last_block_then_takes_new_ones():
    rows = RowBlocks(BlockPool(8), block_size=4)
    row = Row()
    assert rows.append(row, 5).slots == [0, 1, 2, 3, 4] and row.blocks == [0, 1]
    plan = rows.append(row, 4)
    assert plan.copies == [] and plan.slots == [5, 6, 7, 8] and row.blocks == [0, 1, 2] and row.length == 9
    assert rows.blocks_to_append(row, 3) == 0 and rows.blocks_to_append(row, 4) == 1


def test_a_fork_shares_every_block_and_a_write_copies_only_the_last():
    pool = BlockPool(8)
    rows = RowBlocks(pool, block_size=4)
    lender = Row()
    rows.append(lender, 6)  # blocks [0, 1], the second holds 2 entries
    borrower = rows.fork(lender)
    assert borrower.blocks == [0, 1] and pool.num_used == 2 and pool.num_shared == 2  # no second copy
    assert rows.blocks_to_append(borrower, 1) == 1
    plan = rows.append(borrower, 1)
    assert plan.copies == [(1, 2)] and plan.slots == [10] and borrower.blocks == [0, 2]
    assert lender.blocks == [0, 1] and pool.blocks[1].ref_count == 1 and pool.blocks[0].ref_count == 2
    plan = rows.append(lender, 3)  # the lender's last block is its own again: no copy
    assert plan.copies == [] and plan.slots == [6, 7, 12] and lender.blocks == [0, 1, 3]
    pool.check()


def test_a_full_shared_last_block_is_never_copied():
    pool = BlockPool(8)
    rows = RowBlocks(pool, block_size=4)
    lender = Row()
    rows.append(lender, 8)
    borrower = rows.fork(lender)
    plan = rows.append(borrower, 1)
    assert plan.copies == [] and borrower.blocks == [0, 1, 2] and pool.num_used == 3


def test_an_append_the_pool_cannot_hold_changes_nothing():
    pool = BlockPool(2)
    rows = RowBlocks(pool, block_size=4)
    row = Row()
    rows.append(row, 7)
    with pytest.raises(OutOfBlocks):
        rows.append(row, 2)
    assert row.blocks == [0, 1] and row.length == 7 and pool.num_free == 0


def test_eviction_compacts_an_own_row_in_place_and_frees_the_rest():
    pool = BlockPool(8)
    rows = RowBlocks(pool, block_size=4)
    row = Row()
    rows.append(row, 10)  # blocks [0, 1, 2]
    plan = rows.keep(row, [0, 3, 4, 8, 9])
    assert plan.in_place and plan.sources == [0, 3, 4, 8, 9] and plan.targets == [0, 1, 2, 3, 4]
    assert row.blocks == [0, 1] and row.length == 5 and list(pool.free_queue) == [3, 4, 5, 6, 7, 2]
    pool.check()


def test_eviction_of_a_shared_row_writes_fresh_blocks_and_leaves_the_lender_whole():
    pool = BlockPool(8)
    rows = RowBlocks(pool, block_size=4)
    lender = Row()
    rows.append(lender, 10)
    borrower = rows.fork(lender)
    plan = rows.keep(borrower, [1, 2, 9])
    assert not plan.in_place and plan.sources == [1, 2, 9] and plan.targets == [12, 13, 14]
    assert borrower.blocks == [3] and lender.blocks == [0, 1, 2]
    assert [pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [1, 1, 1, 1]
    rows.release(lender)
    rows.release(borrower)
    assert pool.num_free == 8
    with pytest.raises(ValueError, match="kept entries must ascend"):
        rows.keep(Row([0], 2), [1, 0])
    pool.check()


def test_block_hashes_chain_over_the_prefix_and_the_key():
    a = block_hashes(list(range(10)), 4, b"model|full")
    assert len(a) == 2  # the partial third block has none
    assert block_hashes(list(range(8)) + [99, 98], 4, b"model|full") == a
    diverged = block_hashes([0, 1, 2, 3, 4, 5, 6, 99], 4, b"model|full")
    assert diverged[0] == a[0] and diverged[1] != a[1]
    assert not set(block_hashes(list(range(10)), 4, b"model|knorm 0.5")) & set(a)
    assert block_hashes([1, 2, 3, 4], 4, b"k") != block_hashes([1, 2, 3], 4, b"k") + [0]


def test_store_moves_entries_and_counts_its_bytes():
    torch.manual_seed(0)
    pool = BlockPool(6)
    store = BlockStore(6, block_size=4, head_dim=8, dtype=torch.float32)
    assert store.capacity_nbytes == 2 * 6 * 4 * 8 * 4 and store.block_nbytes == 2 * 4 * 8 * 4
    rows = RowBlocks(pool, 4)
    row = Row()
    keys, values = torch.randn(10, 8), torch.randn(10, 8)
    store.write(rows.append(row, 10).slots, keys, values)
    assert store.allocated_nbytes(pool) == 3 * store.block_nbytes
    got_k, got_v = store.read(rows.slots(row))
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    kept = [1, 2, 5, 6, 7]
    plan = rows.keep(row, kept)
    store.move(plan.sources, plan.targets)  # overlapping: target 1 is read as source 1 first
    got_k, got_v = store.read(rows.slots(row))
    assert torch.equal(got_k, keys[kept]) and torch.equal(got_v, values[kept])
    fork = rows.fork(row)
    plan = rows.append(fork, 1)
    store.copy_blocks(plan.copies)
    store.write(plan.slots, torch.ones(1, 8), torch.ones(1, 8))
    assert torch.equal(store.read(rows.slots(fork))[0][:5], keys[kept]) and torch.equal(store.read(rows.slots(row))[0], keys[kept])


def test_swap_out_and_in_is_exact():
    torch.manual_seed(1)
    pool_a, pool_b = BlockPool(4), BlockPool(6)
    a = BlockStore(4, 4, 8, torch.bfloat16)
    b = BlockStore(6, 4, 8, torch.bfloat16)
    pool_b.allocate(3)  # the target pool is partly in use: the blocks land elsewhere
    rows = RowBlocks(pool_a, 4)
    row = Row()
    keys, values = torch.randn(7, 8, dtype=torch.bfloat16), torch.randn(7, 8, dtype=torch.bfloat16)
    a.write(rows.append(row, 7).slots, keys, values)
    swapped = a.swap_out(row.blocks)
    assert swapped.nbytes == 2 * a.block_nbytes
    rows.release(row)
    ids = b.swap_in(pool_b, swapped)
    assert ids == [3, 4]
    back = RowBlocks(pool_b, 4)
    got_k, got_v = b.read(back.slots(Row(ids, 7)))
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    with pytest.raises(OutOfBlocks):
        b.swap_in(pool_b, b.swap_out([0, 1, 2]))


def test_the_memory_package_imports_nothing_above_it():
    """memory/ is the floor: it reads no layout, attention, kernel, policy or engine code."""
    import ast
    from pathlib import Path

    import kvforge.memory

    for path in Path(kvforge.memory.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("kvforge") or name.startswith("kvforge.memory"), f"{path.name} imports {name}"


def test_a_block_compacted_in_place_no_longer_stands_for_its_hash():
    pool = BlockPool(4)
    rows = RowBlocks(pool, 4)
    row = Row()
    rows.append(row, 8)
    pool.mark(0, 7)
    plan = rows.keep(row, [1, 3, 5, 7])
    assert plan.in_place and row.blocks == [0] and pool.lookup(7) is None
    pool.check()


def test_bad_ids_and_counts_change_nothing():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    with pytest.raises(ValueError, match="released more often"):
        pool.release([ids[0], ids[1], ids[1]])
    with pytest.raises(ValueError, match="block 2 is free"):
        pool.share([ids[0], 2])
    assert [pool.blocks[i].ref_count for i in ids] == [1, 1] and pool.num_free == 2
    with pytest.raises(ValueError, match="count=-3"):
        RowBlocks(pool, 4).append(Row(), -3)
    pool.check()


def test_one_arena_holds_blocks_of_any_layout_in_the_same_bytes():
    from kvforge.memory import BlockLayout

    store = BlockStore(4, block_size=4, head_dim=8, dtype=torch.float32)  # blocks of 2 x 4 x 8 floats
    assert store.block_nbytes == 256 and store.capacity_nbytes == 4 * 256
    # 3-byte codes (no flat view of them: read by block and offset) and a per-block scale.
    codes = BlockLayout(6, (("c", (3,), torch.uint8),), (("s", (2,), torch.float16),))
    keys, values = torch.randn(4, 8), torch.randn(4, 8)
    store.write([4, 5, 6, 7], keys, values)  # block 1 holds full-precision entries
    written = torch.randint(0, 255, (6, 3), dtype=torch.uint8)
    store.write_fields([12, 13, 14, 15, 16, 17], {"c": written}, codes)  # block 2 holds codes
    store.write_blocks([2], {"s": torch.tensor([[0.5, 2.0]])}, codes)
    got_k, got_v = store.read([4, 5, 6, 7])
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert torch.equal(store.read_fields([12, 13, 14, 15, 16, 17], ["c"], codes)["c"], written)
    store.copy_blocks([(2, 3)])  # a copy on write moves bytes, whatever the block holds
    assert torch.equal(store.read_fields([18, 19, 20, 21, 22, 23], ["c"], codes)["c"], written)
    assert store.fields(codes)["s"][3].tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="more than the memory's blocks of 256"):
        store.fields(BlockLayout(64, (("c", (8,), torch.uint8),)))


def test_block_key_summaries_follow_every_write_to_their_blocks():
    pool, store = BlockPool(4), BlockStore(4, block_size=4, head_dim=2, dtype=torch.float32)
    rows = RowBlocks(pool, 4)
    sums = store.summaries("sum", [(torch.float32, 0.0)])

    def summarize(keys: torch.Tensor, held: torch.Tensor) -> list[torch.Tensor]:  # (n, 4, 2), (n,) -> [(n, 2)]
        return [(keys * (torch.arange(4) < held[:, None])[..., None]).sum(1)]

    keys, row = torch.arange(20.0).view(10, 2), Row()
    store.write(rows.append(row, 6).slots, keys[:6], keys[:6])
    assert row.blocks == [0, 1] and sums.covered.tolist() == [0, 0, 0, 0]
    sums.refresh(store.keys, torch.tensor([0, 1]), torch.tensor([4, 2]), summarize)
    assert sums.covered.tolist() == [4, 2, 0, 0] and torch.equal(sums.tensors[0][1], keys[4:6].sum(0))
    store.write(rows.append(row, 1).slots, keys[6:7], keys[6:7])  # offset 2 of block 1: past what it describes
    assert sums.covered.tolist() == [4, 2, 0, 0]
    sums.refresh(store.keys, torch.tensor([0, 1]), torch.tensor([4, 3]), summarize)
    assert sums.covered.tolist() == [4, 3, 0, 0] and torch.equal(sums.tensors[0][1], keys[4:7].sum(0))
    fork = rows.fork(row)
    plan = rows.append(fork, 1)  # block 1 is shared and partly filled: the fork copies it to block 2
    store.copy_blocks(plan.copies)
    store.write(plan.slots, keys[7:8], keys[7:8])
    assert plan.copies == [(1, 2)] and sums.covered.tolist() == [4, 3, 3, 0]
    assert torch.equal(sums.tensors[0][2], keys[4:7].sum(0))  # the copy's summary came with it
    store.write([rows.slot(row, 5)], None, keys[9:10])  # a value only: the keys it describes are unchanged
    assert sums.covered.tolist() == [4, 3, 3, 0]
    store.write([rows.slot(row, 1)], keys[9:10], keys[9:10])  # a key below what block 0 describes
    assert sums.covered.tolist() == [0, 3, 3, 0]
    store.write_blocks([2], {"k": torch.zeros(1, 4, 2)}, store.layout)  # whatever a block is given whole, it forgets
    store.grow(2)
    assert sums.covered.tolist() == [0, 3, 0, 0, 0, 0] and sums.tensors[0].shape == (6, 2)
    assert sums.block_nbytes == 8 and set(sums.names({1, 3})) == {sums.tensors[0].data_ptr() + 8, sums.tensors[0].data_ptr() + 24}
