"""A decoding step reads nothing back from the device (checked without CUDA).

On a GPU every value read back to the host (`.item()`, `bool(t)`, `int(t)`, a data-dependent
shape such as `nonzero`) waits for the GPU to finish everything queued. These reads go through
torch's dispatcher as the ops counted below, on the CPU too, so counting them in a decoding step
on the CPU tells what the same step would wait for on a GPU. (`.tolist()` and `.cpu()` of a CPU
tensor do not dispatch: the decode path is kept free of them by reading the code; the one read
per step that remains is the host loop's, the chosen tokens, in `generate.greedy`.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvforge import KVCache, make_policy
from kvforge.generate import DECODE, feed, prefill

READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.nonzero.default"}


class CountReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in READS:
            self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_a_read():
    with torch.inference_mode(), CountReads() as count:
        bool(torch.arange(3).all())
    assert sum(count.reads.values()) == 1


# Policies that do not compress while decoding (the cache grows by one entry per step).
@pytest.mark.parametrize("policy", ["full", "knorm", "snapkv"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_decoding_step_of_the_in_place_layout_reads_nothing_back(tiny_model, policy, batch):
    made = make_policy(policy) if policy == "full" else make_policy(policy, ratio=0.5)
    cache = KVCache(tiny_model, made)
    with torch.inference_mode():
        prefill(tiny_model, cache, list(range(5, 40)))
        caches = [cache] + [cache.fork() for _ in range(batch - 1)]
        batched = KVCache.stack(caches) if batch > 1 else cache
        positions = torch.full((batch,), 35)
        with CountReads() as count:
            for _ in range(4):
                _, positions = feed(tiny_model, batched, [[7]] * batch, positions, DECODE)
    assert dict(count.reads) == {}
    assert batched.get_seq_length() == 39
