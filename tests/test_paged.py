"""The paged layout over one block memory: forks and stacks hold no second copy, a write to a
shared row copies its last block alone, eviction and leaving a batch give blocks back, a bounded
memory refuses what it cannot hold without changing anything."""

from __future__ import annotations

import pytest
import torch

from conftest import held_positions
from kvforge.memory import OutOfBlocks
from kvforge.memory.kvmemory import KVMemory
from kvforge.storage.paged import PagedKV

HEADS, DIM, BLOCK = 2, 8, 4
ENTRY = 2 * DIM * 4  # one K row and one V row, float32


def memory(num_blocks: int | None = None) -> KVMemory:
    return KVMemory(DIM, torch.float32, "cpu", num_blocks, block_size=BLOCK)


def filled(mem: KVMemory, batch: int, t: int, seed: int = 0) -> tuple[PagedKV, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, HEADS, t, DIM, generator=gen), torch.randn(batch, HEADS, t, DIM, generator=gen)
    storage = PagedKV(batch, HEADS, DIM, torch.float32, torch.device("cpu"), memory=mem)
    storage.append(keys, values, torch.arange(t), torch.ones(batch, t, dtype=torch.bool))
    return storage, keys, values


def one_token(storage: PagedKV, position: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(storage.batch, HEADS, 1, DIM, generator=gen), torch.randn(storage.batch, HEADS, 1, DIM, generator=gen)
    storage.append(k, v, torch.tensor([position]), torch.ones(storage.batch, 1, dtype=torch.bool))
    return k, v


def test_rows_take_exact_blocks_and_read_back_what_was_written():
    mem = memory()
    storage, keys, values = filled(mem, 1, 10)
    assert [row.blocks for row in storage.rows] == [[0, 1, 2], [3, 4, 5]]  # 10 entries: 3 blocks per row
    assert storage.allocated_nbytes == mem.allocated_nbytes == 6 * BLOCK * ENTRY
    view = storage.view()
    torch.testing.assert_close(view.keys, keys)
    torch.testing.assert_close(view.values, values)


def test_a_fork_holds_no_second_copy_and_copies_only_its_last_block_on_write():
    mem = memory()
    base, keys, _ = filled(mem, 1, 10)
    fork = base.share(())
    union = {**base.buffers(), **fork.buffers()}
    assert sum(union.values()) == base.allocated_nbytes  # the same blocks, counted once
    assert mem.pool.num_shared == 6
    k, _ = one_token(fork, 10, seed=1)
    # Each row's last block (2 of 4 entries filled) was shared: that block alone is copied.
    assert [row.blocks for row in fork.rows] == [[0, 1, 6], [3, 4, 7]]
    assert [row.blocks for row in base.rows] == [[0, 1, 2], [3, 4, 5]]
    assert mem.pool.num_used == 8
    torch.testing.assert_close(fork.view().keys, torch.cat([keys, k], 2))
    torch.testing.assert_close(base.view().keys, keys)  # the lender is unchanged


def test_evicting_compacts_in_place_and_returns_the_rest_to_the_pool():
    mem = memory()
    storage, keys, _ = filled(mem, 1, 10)
    view = storage.view()
    index = torch.tensor([[[0, 2, 9], [1, 5, 8]]])
    storage.keep(view, index, torch.ones_like(index, dtype=torch.bool))
    assert [row.blocks for row in storage.rows] == [[0], [3]] and mem.pool.num_used == 2
    assert held_positions(storage) == [[0, 2, 9], [1, 5, 8]]
    torch.testing.assert_close(storage.view().keys[0, 0], keys[0, 0, [0, 2, 9]])


def test_evicting_a_shared_row_writes_fresh_blocks_and_leaves_the_lender_whole():
    mem = memory()
    base, keys, _ = filled(mem, 1, 10)
    fork = base.share(())
    index = torch.tensor([[[0, 9], [3, 4]]])
    fork.keep(fork.view(), index, torch.ones_like(index, dtype=torch.bool))
    assert [row.blocks for row in fork.rows] == [[6], [7]]
    torch.testing.assert_close(fork.view().keys[0, 1], keys[0, 1, [3, 4]])
    torch.testing.assert_close(base.view().keys, keys)


def test_stack_take_and_select_move_blocks_and_dropping_returns_them():
    mem = memory()
    a, ka, _ = filled(mem, 1, 5, seed=1)
    b, kb, _ = filled(mem, 1, 3, seed=2)
    batch = PagedKV.stack([a, b], [0, 2], take=True)
    assert mem.pool.num_used == 6 and mem.pool.num_shared == 0  # nothing copied, nothing shared
    assert held_positions(batch)[2] == [2, 3, 4]  # b's positions moved right by its padding
    del a, b
    assert mem.pool.num_used == 6  # consumed parts return nothing: their blocks are the batch's
    left = batch.select([1])
    assert mem.pool.num_used == 6  # the batch still holds a's rows until it is dropped
    del batch
    assert mem.pool.num_used == 2  # a's rows went back to the pool, b's are left's
    torch.testing.assert_close(left.view().keys, kb)
    del left
    assert mem.pool.num_used == 0 and mem.capacity_nbytes == 0  # an unbounded memory trims itself


def test_a_batch_split_by_several_selects_hands_each_row_out_once():
    mem = memory()
    batch, keys, _ = filled(mem, 3, 5)
    parts = [batch.select([b]) for b in (0, 1, 2)]
    again = batch.select([1])  # a row handed out already is forked, never handed out twice
    assert mem.pool.num_used == 12 and mem.pool.num_shared == 4
    del batch
    assert mem.pool.num_used == 12
    for b, part in enumerate(parts):
        torch.testing.assert_close(part.view().keys, keys[b : b + 1])
    torch.testing.assert_close(again.view().keys, keys[1:2])
    del parts, part, again
    assert mem.pool.num_used == 0


def test_set_values_copies_a_shared_block_before_overwriting_it():
    mem = memory()
    base, _, values = filled(mem, 1, 6)
    fork = base.share(())
    view = fork.view()
    changed = torch.zeros(1, HEADS, 6, dtype=torch.bool)
    changed[0, 0, 5] = True
    fork.set_values(view, torch.zeros(1, HEADS, 6, DIM), changed)
    assert fork.rows[0].blocks == [0, 4] and fork.rows[1].blocks == base.rows[1].blocks
    assert float(fork.view().values[0, 0, 5].abs().sum()) == 0.0
    torch.testing.assert_close(base.view().values, values)


def test_a_bounded_memory_refuses_an_append_it_cannot_hold_and_changes_nothing():
    mem = memory(num_blocks=5)
    storage, keys, _ = filled(mem, 1, 8)  # 2 blocks per row: 4 used, 1 free
    before = [list(row.blocks) for row in storage.rows]
    with pytest.raises(OutOfBlocks, match="takes 2 blocks, 1 free of 5"):
        one_token(storage, 8, seed=3)
    assert [row.blocks for row in storage.rows] == before and storage.entries == 16
    torch.testing.assert_close(storage.view().keys, keys)


def test_a_memory_sized_in_bytes_names_the_least_it_can_be():
    assert KVMemory.of_bytes(10 * BLOCK * ENTRY, DIM, torch.float32, block_size=BLOCK).pool.num_blocks == 10
    with pytest.raises(ValueError, match=f"give at least {BLOCK * ENTRY}"):
        KVMemory.of_bytes(100, DIM, torch.float32, block_size=BLOCK)


def test_a_cache_swapped_out_and_in_decodes_exactly_as_one_that_stayed(tiny_model):
    from conftest import left_padded
    from test_policy_matrix import decode, prefill_logits

    from kvforge import make_policy

    ids, mask = left_padded([24, 17])
    mem = KVMemory(16, torch.float32, "cpu", num_blocks=64)  # the shared memory's block size: blocks move as they are
    with torch.inference_mode():
        stayed, logits = prefill_logits(tiny_model, make_policy("knorm", ratio=0.5), ids, mask, "paged")
        want = decode(tiny_model, stayed, logits, ids.shape[1], 3)
        moved, logits = prefill_logits(tiny_model, make_policy("knorm", ratio=0.5), ids, mask, "paged")
        held = moved.nbytes
        for layer in moved.layers:  # into a bounded memory of its own, as an engine's
            layer.storage = PagedKV.swap_in(layer.storage.swap_out("cpu"), mem, layer.device)
        assert mem.pool.num_used > 0 and moved.nbytes == held
        swapped = moved.swap_out("cpu")
        assert mem.pool.num_used == 0 and moved.nbytes == 0  # every block went back
        assert sum(part.nbytes for part in swapped) == held  # bytes as they were, codes stay codes
        with pytest.raises(ValueError, match="same block size"):
            PagedKV.swap_in(swapped[0], memory(), torch.device("cpu"))  # blocks of 4 entries: they do not fit
        moved.memory = mem
        moved.swap_in(swapped)
        got = decode(tiny_model, moved, logits, ids.shape[1], 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
