"""KV blocks: the layout (how many blocks of each kind), paged full-attention KV, windowed sliding
KV, the prefix cache, fork with copy-on-write.

Two pools of fixed-size blocks, one per layer kind. A sequence has one block table per pool, indexed
by position // block_size. Full-attention tables grow with the sequence; in sliding tables, blocks
that fall out of the window are released at once (their entry becomes NO_BLOCK), so a sequence
never holds more than window + the tokens of one step there. MTP layers are sliding layers.

Prefix caching: a full block of tokens is named by a key, a strong hash (BLAKE2b, 128 bits) of the
key of the block before it and the block's tokens. A cached block also keeps its tokens and its
parent's key, and a lookup compares both, so a hash collision can never serve another prefix's KV.
Image placeholders are the same ids for every image, so a block overlapping an image's placeholders
also hashes (and compares) that image's content key: different images never share KV.
Blocks keep their key after release (in LRU order) until they are reused, so a later prompt with the
same prefix picks them up. A hit of h blocks counts only if the full pool holds blocks 0..h-1 and
the sliding pool holds every block the next query still needs (those covering the last window).

With MTP, a sequence's MTP caches (MTP layers' KV and the hidden states they chain on, all in
sliding blocks) are filled after the target's, up to `mtp_computed`; blocks are named for the
prefix cache, and sliding blocks released, only once both are past them. Positions written beyond
num_computed are scratch (rejected drafts): `trim` drops the blocks that hold nothing else.

A sequence holding blocks also holds a row of the runner's device copy of the full-attention
table, and every change to that table is noted there: `synced` counts the leading entries the
device already has, so a step uploads only new entries (the runner keeps no sliding tables: a
window long, they travel whole with each step).
"""

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stepflash.config import FULL, SLIDING, EngineConfig, LayerKind, ModelConfig
from stepflash.distributed import Parallel

if TYPE_CHECKING:
    from stepflash.multimodal import PlacedImage

NO_BLOCK = -1
ROOT_KEY = b""  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """The prefix-cache key of a block: a hash of its parent's key and its tokens."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return digest.digest()


def block_entry(parent: bytes, token_ids: list[int], index: int, block_size: int,
                images: "Sequence[PlacedImage]" = ()) -> "CachedBlock":
    """What block `index` of a sequence is cached as: its tokens, and the content keys of the images
    whose placeholders it holds (hashed with the parent's key)."""
    start, end = index * block_size, (index + 1) * block_size
    tokens = tuple(token_ids[start:end])
    extra = b"".join(im.image.key for im in images if im.start < end and im.end > start)
    return CachedBlock(block_key(parent + extra, tokens), parent, tokens, extra)


# -- layout -------------------------------------------------------------------------------------------
def kv_bytes_per_block(cfg: ModelConfig, layer_ids: list[int], block_size: int, dtype: torch.dtype,
                       hidden_levels: int = 0, parallel: Parallel = Parallel()) -> int:
    """Bytes one block takes in every layer of `layer_ids` on one rank (its KV heads), plus
    `hidden_levels` MTP hidden caches."""
    item = torch.empty((), dtype=dtype).element_size()
    kv = sum(2 * block_size * parallel.kv_part(cfg.layers[i].num_kv_heads) * cfg.layers[i].head_dim * item
             for i in layer_ids)
    return kv + hidden_levels * block_size * cfg.hidden_size * item


@dataclass(frozen=True)
class KVLayout:
    """How the KV cache is cut: blocks per kind and the limits they were sized for. The planner,
    the KV manager, the runner's tables and the graphs all read it from here."""

    block_size: int
    window: int  # sliding window (0: no sliding layers)
    num_mtp: int
    num_blocks: dict[LayerKind, int]
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int

    @property
    def kinds(self) -> list[LayerKind]:
        return [kind for kind in (FULL, SLIDING) if self.num_blocks.get(kind, 0) > 0]

    def table_width(self, kind: LayerKind, rows: int | None = None) -> int:
        """Table columns a sequence can need: max_model_len plus drafts (sliding tables too are
        indexed by position // block_size); with `rows`, those a step's table needs for chunks of up
        to that many rows (a sliding layer's reads from the window on, plus the drafts reserved)."""
        if kind == SLIDING and rows is not None:
            return math.ceil((self.window + rows + self.num_mtp) / self.block_size) + 2
        return math.ceil((self.max_model_len + self.num_mtp + 1) / self.block_size)

    @staticmethod
    def sliding_blocks(window: int, num_mtp: int, block_size: int, max_num_seqs: int, chunk: int) -> int:
        """Sliding blocks for max_num_seqs sequences: each holds its window, what its MTP caches lag
        behind and its drafts (2 num_mtp + 1 positions at most), over partial blocks at both ends;
        plus a prefill chunk (two with MTP, whose caches catch up a step later)."""
        per_seq = math.ceil((window - 1 + 2 * num_mtp) / block_size) + 2
        return max_num_seqs * per_seq + (2 if num_mtp else 1) * math.ceil(chunk / block_size)


def plan_kv_layout(cfg: ModelConfig, ec: EngineConfig, num_mtp: int, dtype: torch.dtype,
                   device: torch.device, parallel: Parallel = Parallel()) -> KVLayout:
    """Cut kv_cache_bytes into blocks: sliding layers get what max_num_seqs windows and one step's
    tokens need, full layers all the rest, so context length is limited by the full layers alone.
    Settings the user left open shrink to fit (concurrency first, then the prefill chunk, then the
    context); the engine refuses only when one sequence of the context cannot fit. The default
    budget: on a GPU gpu_memory_utilization of free memory; on the CPU what max_num_seqs sequences of the whole
    context need, at most a quarter of available memory. Under tensor parallelism every size is
    one rank's (its KV heads; kv_cache_bytes per rank), and rank 0's plan holds for all ranks."""
    bs = ec.block_size
    layers = cfg.decoder_layers + cfg.mtp_layers[:num_mtp]
    ids = {kind: [s.index for s in layers if s.attention_type == kind] for kind in (FULL, SLIDING)}
    bpb = {FULL: kv_bytes_per_block(cfg, ids[FULL], bs, dtype, parallel=parallel),
           SLIDING: kv_bytes_per_block(cfg, ids[SLIDING], bs, dtype, num_mtp, parallel)}
    window = cfg.sliding_window if ids[SLIDING] else 0
    length = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    seqs, chunk = ec.max_num_seqs or 64, ec.max_num_batched_tokens or 1024
    one_seq = math.ceil((length + num_mtp + 1) / bs) + 1  # a block of slack for copy-on-write
    budget = ec.kv_cache_bytes
    if budget is None and device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * ec.gpu_memory_utilization)
    elif budget is None:
        want = seqs * one_seq * bpb[FULL] + KVLayout.sliding_blocks(window, num_mtp, bs, seqs, chunk) * bpb[SLIDING]
        budget = min(want, _available_memory() // 4)

    def full_blocks(seqs: int, chunk: int) -> int:
        sliding = KVLayout.sliding_blocks(window, num_mtp, bs, seqs, chunk) if ids[SLIDING] else 0
        return (budget - sliding * bpb[SLIDING]) // bpb[FULL] if ids[FULL] else 1 << 62

    while full_blocks(seqs, chunk) < one_seq and ec.max_num_seqs is None and seqs > 1:
        seqs //= 2
    while full_blocks(seqs, chunk) < one_seq and ec.max_num_batched_tokens is None and chunk > max(64, bs):
        chunk //= 2
    full = full_blocks(seqs, chunk)
    if full < one_seq:
        capacity = (full - 1) * bs - num_mtp - 1
        if ec.max_model_len is not None or capacity < bs:
            need = budget + (one_seq - full) * bpb[FULL]
            raise ValueError(
                f"kv_cache_bytes={budget} holds {max(capacity, 0)} tokens of context per sequence; max_model_len="
                f"{length} needs about {need} bytes (with max_num_seqs={seqs}, max_num_batched_tokens={chunk}): "
                "raise kv_cache_bytes or lower max_model_len, max_num_seqs or max_num_batched_tokens")
        length = capacity
    num_blocks = {FULL: full if ids[FULL] else 0,
                  SLIDING: KVLayout.sliding_blocks(window, num_mtp, bs, seqs, chunk) if ids[SLIDING] else 0}
    return KVLayout(bs, window, num_mtp, num_blocks, length, seqs, chunk)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# -- blocks -------------------------------------------------------------------------------------------
@dataclass
class CachedBlock:
    """What a block's prefix-cache key stands for, compared on every hit."""

    key: bytes
    parent: bytes
    tokens: tuple[int, ...]
    extra: bytes = b""  # content keys of the images whose placeholders the block holds


class BlockPool:
    """Reference-counted blocks of one kind; free blocks in eviction order; key <-> block map."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, CachedBlock] = {}
        self.block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("KV block pool exhausted")  # callers check capacity first
        block, _ = self.free.popitem(last=False)
        if block in self.cached:  # evict its cached content
            del self.block_of[self.cached.pop(block).key]
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
            if block not in self.cached:  # nothing worth keeping: reuse it first
                self.free.move_to_end(block, last=False)

    def lookup(self, key: bytes, parent: bytes | None = None, tokens: tuple[int, ...] | None = None,
               extra: bytes = b"") -> int | None:
        """The block cached under `key`; when parent and tokens are given, only if it holds exactly them
        (and the same images)."""
        block = self.block_of.get(key)
        if block is None or tokens is None:
            return block
        entry = self.cached[block]
        return block if entry.parent == parent and entry.tokens == tokens and entry.extra == extra else None

    def register(self, block: int, entry: CachedBlock) -> None:
        if entry.key not in self.block_of and block not in self.cached:
            self.block_of[entry.key] = block
            self.cached[block] = entry


@dataclass
class BlockTables:
    """One sequence's blocks: per pool, block ids indexed by position // block_size."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full, computed blocks
    num_computed: int = 0  # positions whose KV is in the cache
    mtp_computed: int = 0  # positions whose MTP caches are filled (when the manager tracks MTP)
    synced: int = field(default=0, compare=False)  # leading full-attention entries the device holds
    row: int = field(default=-1, compare=False)  # its row of the runner's device tables (-1: none yet)

    def table(self, kind: LayerKind) -> list[int]:
        return self.full if kind == FULL else self.sliding

    def changed(self, kind: LayerKind, index: int) -> None:
        """Entries from `index` on of a table were (re)written or dropped: the device's full-attention
        table must take them again."""
        if kind == FULL:
            self.synced = min(self.synced, index)


@dataclass(frozen=True)
class BlockCopy:
    """Copy-on-write: the runner copies block `src` to `dst` in every layer of `kind` before the step."""

    kind: LayerKind
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
        self.num_rows = 0  # device table rows handed out so far (a sequence holds one while it holds blocks)
        self._free_rows: list[int] = []

    @classmethod
    def of(cls, layout: KVLayout, enable_prefix_caching: bool) -> "KVCacheManager":
        return cls(layout.block_size, layout.num_blocks[FULL], layout.num_blocks[SLIDING], layout.window,
                   enable_prefix_caching, track_mtp=layout.num_mtp > 0)

    # -- capacity -------------------------------------------------------------------------------
    def _first_needed_block(self, next_position: int) -> int:
        """Lowest sliding block a query at `next_position` (or later) reads."""
        return max(0, next_position - self.window + 1) // self.block_size

    def blocks_needed(self, tables: BlockTables, num_new: int) -> dict[LayerKind, int]:
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
        self._claim_row(tables)
        total = -(-(tables.num_computed + num_new) // self.block_size)
        for kind in self.kinds:
            pool, table = self.pools[kind], tables.table(kind)
            if tables.num_computed % self.block_size and table and table[-1] != NO_BLOCK \
                    and pool.ref_count[table[-1]] > 1:
                new = pool.allocate()
                copies.append(BlockCopy(kind, table[-1], new))
                pool.release(table[-1])
                table[-1] = new
                tables.changed(kind, len(table) - 1)
            while len(table) < total:
                table.append(pool.allocate())
        return copies

    def commit(self, tables: BlockTables, token_ids: list[int], num_computed: int,
               images: "Sequence[PlacedImage]" = ()) -> None:
        """After a step computed positions up to `num_computed` (and, with MTP, the MTP caches up to
        tables.mtp_computed): name newly complete blocks for the prefix cache, then release sliding
        blocks no later query can read."""
        tables.num_computed = num_computed
        ready = min(num_computed, tables.mtp_computed) if self.track_mtp else num_computed
        bs = self.block_size
        while len(tables.hashes) < ready // bs:
            i = len(tables.hashes)
            entry = block_entry(tables.hashes[-1] if tables.hashes else ROOT_KEY, token_ids, i, bs, images)
            tables.hashes.append(entry.key)
            if self.enable_prefix_caching:
                for kind in self.kinds:
                    block = tables.table(kind)[i]
                    if block != NO_BLOCK:
                        self.pools[kind].register(block, entry)
        if SLIDING in self.kinds:  # oldest first, from where earlier commits stopped (O(new releases))
            end = start = min(self._first_needed_block(ready), len(tables.sliding))
            while start > 0 and tables.sliding[start - 1] != NO_BLOCK:
                start -= 1
            for i in range(start, end):
                self.pools[SLIDING].release(tables.sliding[i])
                tables.sliding[i] = NO_BLOCK

    def trim(self, tables: BlockTables, keep_positions: int) -> None:
        """Release blocks past the first `keep_positions` positions (held for rejected drafts)."""
        keep = -(-keep_positions // self.block_size)
        for kind in self.kinds:
            table = tables.table(kind)
            while len(table) > keep:
                block = table.pop()
                if block != NO_BLOCK:
                    self.pools[kind].release(block)
            tables.changed(kind, len(table))

    # -- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, tables: BlockTables, token_ids: list[int], images: "Sequence[PlacedImage]" = ()) -> int:
        """Attach cached blocks for the longest usable prefix of `token_ids` (with `images` at their
        places) to empty `tables` (at least one token is left to compute). Returns the number of
        cached tokens."""
        assert not tables.full and not tables.sliding, "prefix matching needs an empty sequence"
        self.prefix_queries += len(token_ids)
        bs = self.block_size
        chain: list[CachedBlock] = []
        for i in range((len(token_ids) - 1) // bs):
            entry = block_entry(chain[-1].key if chain else ROOT_KEY, token_ids, i, bs, images)
            if FULL in self.kinds and self._lookup(FULL, entry) is None:
                break
            chain.append(entry)
        hit = len(chain)
        while hit > 0 and not self._sliding_present(chain, hit):
            hit -= 1
        for kind in self.kinds:
            table = tables.table(kind)
            first = self._first_needed_block(hit * bs) if kind == SLIDING else 0
            table.extend([NO_BLOCK] * first)
            for entry in chain[first:hit]:
                block = self._lookup(kind, entry)
                self.pools[kind].retain(block)
                table.append(block)
        tables.hashes = [entry.key for entry in chain[:hit]]
        tables.num_computed = tables.mtp_computed = hit * bs
        self._claim_row(tables)
        self.prefix_hits += hit * bs
        return hit * bs

    def _lookup(self, kind: LayerKind, entry: CachedBlock) -> int | None:
        return self.pools[kind].lookup(entry.key, entry.parent, entry.tokens, entry.extra)

    def _sliding_present(self, chain: list[CachedBlock], hit: int) -> bool:
        if SLIDING not in self.kinds:
            return True
        first = self._first_needed_block(hit * self.block_size)
        return all(self._lookup(SLIDING, entry) is not None for entry in chain[first:hit])

    # -- lifetime -------------------------------------------------------------------------------
    def fork(self, parent: BlockTables) -> BlockTables:
        """A child sharing every block of `parent` (copy-on-write on its next append)."""
        child = BlockTables(list(parent.full), list(parent.sliding), list(parent.hashes), parent.num_computed,
                            parent.mtp_computed)
        for kind in self.kinds:
            for block in child.table(kind):
                if block != NO_BLOCK:
                    self.pools[kind].retain(block)
        self._claim_row(child)
        return child

    def _claim_row(self, tables: BlockTables) -> None:
        if tables.row < 0:
            tables.row = self._free_rows.pop() if self._free_rows else self.num_rows
            self.num_rows = max(self.num_rows, tables.row + 1)
            tables.synced = 0

    def free(self, tables: BlockTables) -> None:
        for kind in self.kinds:
            table = tables.table(kind)
            for block in reversed(table):  # tail first: the head stays cached longest
                if block != NO_BLOCK:
                    self.pools[kind].release(block)
            table.clear()
        tables.hashes.clear()
        tables.synced = 0
        tables.num_computed = tables.mtp_computed = 0
        if tables.row >= 0:
            self._free_rows.append(tables.row)
            tables.row = -1

    def usage(self) -> dict[str, dict[str, int]]:
        return {kind.name.lower(): {"total": p.num_blocks, "free": p.num_free, "used": p.num_blocks - p.num_free}
                for kind, p in self.pools.items()}
