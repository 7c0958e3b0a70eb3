"""KV block management: paged full-attention KV, windowed sliding KV, prefix cache, fork with copy-on-write.

Two pools of fixed-size blocks, one per layer kind. A sequence has one block table per pool, indexed
by position // block_size. Full-attention tables grow with the sequence; in sliding tables, blocks
that fall out of the window are released at once (their entry becomes NO_BLOCK), so a sequence
never holds more than window + the tokens of one step there. MTP layers are sliding layers.

Prefix caching: a full block of tokens is named by a hash chained over all tokens before it. Blocks
keep their hash after release (in LRU order) until they are reused, so a later prompt with the same
prefix picks them up. A hit of h blocks counts only if the full pool holds blocks 0..h-1 and the
sliding pool holds every block the next query still needs (those covering the last window).

With MTP, a sequence's MTP caches (MTP layers' KV and the hidden states they chain on, all in
sliding blocks) are filled after the target's, up to `mtp_computed`; blocks are named for the
prefix cache, and sliding blocks released, only once both are past them. Speculative positions
written beyond num_computed are scratch: `trim` drops blocks that hold nothing else.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

NO_BLOCK = -1
FULL, SLIDING = "full", "sliding"


class BlockPool:
    """Reference-counted blocks of one kind; free blocks in eviction order; hash <-> block map."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("KV block pool exhausted")  # callers check capacity first
        block, _ = self.free.popitem(last=False)
        if block in self.hash_of:  # evict its cached content
            del self.block_of[self.hash_of.pop(block)]
        self.ref_count[block] = 1
        return block

    def retain(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"block {block} released more often than retained")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None
            if block not in self.hash_of:  # nothing worth keeping: reuse it first
                self.free.move_to_end(block, last=False)

    def lookup(self, block_hash: int) -> int | None:
        return self.block_of.get(block_hash)

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self.block_of and block not in self.hash_of:
            self.block_of[block_hash] = block
            self.hash_of[block] = block_hash


@dataclass
class BlockTables:
    """One sequence's blocks: per pool, block ids indexed by position // block_size."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes of its full, computed blocks
    num_computed: int = 0  # positions whose KV is in the cache
    mtp_computed: int = 0  # positions whose MTP caches are filled (when the manager tracks MTP)

    def table(self, kind: str) -> list[int]:
        return self.full if kind == FULL else self.sliding


@dataclass(frozen=True)
class BlockCopy:
    """Copy-on-write: the runner copies block `src` to `dst` in every layer of `kind` before the step."""

    kind: str
    src: int
    dst: int


class KVCacheManager:
    def __init__(self, block_size: int, num_full_blocks: int, num_sliding_blocks: int, window: int,
                 enable_prefix_caching: bool = True, track_mtp: bool = False) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.block_size, self.window = block_size, window
        self.pools = {FULL: BlockPool(num_full_blocks), SLIDING: BlockPool(num_sliding_blocks)}
        self.kinds = [k for k, n in ((FULL, num_full_blocks), (SLIDING, num_sliding_blocks)) if n > 0]
        self.enable_prefix_caching = enable_prefix_caching
        self.track_mtp = track_mtp
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # -- capacity -------------------------------------------------------------------------------
    def _first_needed_block(self, next_position: int) -> int:
        """Lowest sliding block a query at `next_position` (or later) reads."""
        return max(0, next_position - self.window + 1) // self.block_size

    def blocks_needed(self, tables: BlockTables, num_new: int) -> dict[str, int]:
        """New blocks per pool to store `num_new` more positions (copy-on-write included)."""
        total = -(-(tables.num_computed + num_new) // self.block_size)
        partial = tables.num_computed % self.block_size != 0
        needed = {}
        for kind in self.kinds:
            table = tables.table(kind)
            shared_tail = partial and table and table[-1] != NO_BLOCK and self.pools[kind].ref_count[table[-1]] > 1
            needed[kind] = max(0, total - len(table)) + int(bool(shared_tail))
        return needed

    def can_append(self, tables: BlockTables, num_new: int, reserve: int = 0) -> bool:
        needed = self.blocks_needed(tables, num_new)
        return all(self.pools[k].num_free - (reserve if k == FULL else 0) >= n for k, n in needed.items())

    # -- growth ---------------------------------------------------------------------------------
    def append(self, tables: BlockTables, num_new: int) -> list[BlockCopy]:
        """Make room for `num_new` positions after num_computed; returns copies the runner must do."""
        copies = []
        total = -(-(tables.num_computed + num_new) // self.block_size)
        for kind in self.kinds:
            pool, table = self.pools[kind], tables.table(kind)
            if tables.num_computed % self.block_size and table and table[-1] != NO_BLOCK \
                    and pool.ref_count[table[-1]] > 1:
                new = pool.allocate()
                copies.append(BlockCopy(kind, table[-1], new))
                pool.release(table[-1])
                table[-1] = new
            while len(table) < total:
                table.append(pool.allocate())
        return copies

    def commit(self, tables: BlockTables, token_ids: list[int], num_computed: int) -> None:
        """After a step computed positions up to `num_computed` (and, with MTP, the MTP caches up to
        tables.mtp_computed): name newly complete blocks for the prefix cache, then release sliding
        blocks no later query can read."""
        tables.num_computed = num_computed
        ready = min(num_computed, tables.mtp_computed) if self.track_mtp else num_computed
        bs = self.block_size
        while len(tables.hashes) < ready // bs:
            i = len(tables.hashes)
            parent = tables.hashes[-1] if tables.hashes else 0
            block_hash = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            tables.hashes.append(block_hash)
            if self.enable_prefix_caching:
                for kind in self.kinds:
                    block = tables.table(kind)[i]
                    if block != NO_BLOCK:
                        self.pools[kind].register(block, block_hash)
        if SLIDING in self.kinds:
            pool = self.pools[SLIDING]
            for i in range(min(self._first_needed_block(ready), len(tables.sliding))):
                if tables.sliding[i] != NO_BLOCK:
                    pool.release(tables.sliding[i])
                    tables.sliding[i] = NO_BLOCK

    def trim(self, tables: BlockTables) -> None:
        """Release blocks past the last computed position (held for rejected speculative tokens)."""
        keep = -(-tables.num_computed // self.block_size)
        for kind in self.kinds:
            table = tables.table(kind)
            while len(table) > keep:
                block = table.pop()
                if block != NO_BLOCK:
                    self.pools[kind].release(block)

    # -- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, tables: BlockTables, token_ids: list[int]) -> int:
        """Attach cached blocks for the longest usable prefix of `token_ids` to empty `tables`
        (at least one token is left to compute). Returns the number of cached tokens."""
        assert not tables.full and not tables.sliding, "prefix matching needs an empty sequence"
        self.prefix_queries += len(token_ids)
        bs = self.block_size
        hashes: list[int] = []
        for i in range((len(token_ids) - 1) // bs):
            block_hash = hash((hashes[-1] if hashes else 0, tuple(token_ids[i * bs:(i + 1) * bs])))
            if FULL in self.kinds and self.pools[FULL].lookup(block_hash) is None:
                break
            hashes.append(block_hash)
        hit = len(hashes)
        while hit > 0 and not self._sliding_present(hashes, hit):
            hit -= 1
        for kind in self.kinds:
            pool, table = self.pools[kind], tables.table(kind)
            first = self._first_needed_block(hit * bs) if kind == SLIDING else 0
            table.extend([NO_BLOCK] * first)
            for h in hashes[first:hit]:
                block = pool.lookup(h)
                pool.retain(block)
                table.append(block)
        tables.hashes = hashes[:hit]
        tables.num_computed = tables.mtp_computed = hit * bs
        self.prefix_hits += hit * bs
        return hit * bs

    def _sliding_present(self, hashes: list[int], hit: int) -> bool:
        if SLIDING not in self.kinds:
            return True
        pool = self.pools[SLIDING]
        first = self._first_needed_block(hit * self.block_size)
        return all(pool.lookup(h) is not None for h in hashes[first:hit])

    # -- lifetime -------------------------------------------------------------------------------
    def fork(self, parent: BlockTables) -> BlockTables:
        """A child sharing every block of `parent` (copy-on-write on its next append)."""
        child = BlockTables(list(parent.full), list(parent.sliding), list(parent.hashes), parent.num_computed,
                            parent.mtp_computed)
        for kind in self.kinds:
            for block in child.table(kind):
                if block != NO_BLOCK:
                    self.pools[kind].retain(block)
        return child

    def free(self, tables: BlockTables) -> None:
        for kind in self.kinds:
            table = tables.table(kind)
            for block in reversed(table):  # tail first: the head stays cached longest
                if block != NO_BLOCK:
                    self.pools[kind].release(block)
            table.clear()
        tables.hashes.clear()
        tables.num_computed = tables.mtp_computed = 0

    def usage(self) -> dict[str, dict[str, int]]:
        return {kind: {"total": p.num_blocks, "free": p.num_free, "used": p.num_blocks - p.num_free}
                for kind, p in self.pools.items()}
