"""Prefix-affine routing, as plain bookkeeping (no Ray here): a prompt's route is the chained hashes
of its first full blocks; the table remembers which replicas were sent which blocks, and `choose`
ranks the replicas for a new prompt. Tested on its own with exact answers."""

from __future__ import annotations

from collections import OrderedDict

from kvforge.memory.hashing import block_hashes

ROUTE_BLOCK = 16  # tokens per routed block (the pool's block size by default)
ROUTE_BLOCKS = 256  # blocks of a prompt routed on at most (4,096 tokens): deeper ones decide nothing more
MIN_SHARED = 0.25  # a replica is affine to a prompt when it was sent at least this share of its route
SPILL = 4  # requests the affine replica may have beyond the least busy one before the prompt goes elsewhere
TABLE_BLOCKS = 1 << 20  # block hashes remembered at most (oldest forgotten first)


def route_of(ids: list[int]) -> list[int]:
    """[blocks] the chained hashes of the prompt's first full blocks: block i's hash stands for
    every token up to the end of block i, so equal hashes at depth i mean equal prefixes."""
    return block_hashes(ids[: ROUTE_BLOCK * ROUTE_BLOCKS], ROUTE_BLOCK, b"kvforge-route")


class AffinityTable:
    """Which replicas were sent which blocks. Invariant: a replica recorded for block i of a route
    is recorded for blocks 0..i of it too (a route is recorded whole), until forgotten."""

    def __init__(self, capacity: int = TABLE_BLOCKS) -> None:
        self.capacity = capacity
        self.holders: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> replicas, oldest first

    def record(self, route: list[int], replica: str) -> None:
        for block in route:
            self.holders.setdefault(block, set()).add(replica)
            self.holders.move_to_end(block)
        while len(self.holders) > self.capacity:
            self.holders.popitem(last=False)

    def deepest(self, route: list[int], among: set[str]) -> tuple[int, set[str]]:
        """(blocks, replicas): the most leading blocks of `route` any of `among` was sent, and which."""
        for depth in range(len(route), 0, -1):
            held = self.holders.get(route[depth - 1], set()) & among
            if held:
                return depth, held
        return 0, set()

    def forget(self, replica: str) -> None:
        """A replica gone: nothing is routed to it for what it held."""
        for block in [b for b, held in self.holders.items() if replica in held]:
            self.holders[block].discard(replica)
            if not self.holders[block]:
                del self.holders[block]


def choose(table: AffinityTable, route: list[int], queued: dict[str, int]) -> list[list[str]]:
    """Replicas ranked for a prompt, best first, given each one's requests in flight: the replicas
    affine to it (sent at least MIN_SHARED of its route) that are at most SPILL requests busier
    than the least busy replica, least busy first; then every replica, least busy first."""
    by_load = sorted(queued, key=lambda r: (queued[r], r))
    depth, held = table.deepest(route, set(queued))
    if not route or depth < MIN_SHARED * len(route):
        return [by_load]
    least = queued[by_load[0]]
    affine = [r for r in by_load if r in held and queued[r] - least <= SPILL]
    return [affine, by_load] if affine else [by_load]
