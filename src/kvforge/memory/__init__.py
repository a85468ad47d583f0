"""Who owns K/V memory: a block pool (`pool.py`), block tables of rows (`rows.py`), the tensors
behind the block ids (`store.py`) and the hashes of full blocks for prefix sharing (`hashing.py`)."""

from kvforge.memory.pool import BlockPool, OutOfBlocks
from kvforge.memory.rows import Row, RowBlocks
from kvforge.memory.store import BlockLayout, BlockStore, Swapped

__all__ = ["BlockLayout", "BlockPool", "BlockStore", "OutOfBlocks", "Row", "RowBlocks", "Swapped"]
