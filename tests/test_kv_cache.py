"""KVCacheManager: stateful property tests against a shadow model of block contents, plus unit tests.

The state machine plays the scheduler and the runner at once. Besides the manager's bookkeeping it
keeps a shadow of what every physical block holds: slot `pos % block_size` of a block written for
position `pos` of a sequence holds the whole token prefix `tokens[:pos + 1]` (the KV of a position
depends on everything before it). Copy-on-write copies are applied to the shadow as the runner would.
So any missing copy, wrongly shared block or stale prefix-cache entry shows up as a sequence whose
blocks do not hold its own prefix.
"""

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from stepflash.engine.kv_cache import FULL, NO_BLOCK, SLIDING, BlockCopy, BlockPool, BlockTables, KVCacheManager

MAX_LEN = 40  # tokens per sequence, so the small pools stay under pressure without growing forever
ALPHABET = st.integers(0, 1)  # two token ids: prefixes repeat often


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Seq:
    tokens: list[int]
    tables: BlockTables = field(default_factory=BlockTables)
    hashes_at_preempt: list[int] = field(default_factory=list)


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv: KVCacheManager | None = None
        self.running: dict[int, Seq] = {}
        self.preempted: dict[int, Seq] = {}
        self.next_id = 0
        # shadow[kind][block][slot]: token prefix whose KV the slot holds (None: never written)
        self.shadow: dict[str, list[list[tuple[int, ...] | None]]] = {}

    # -- setup ----------------------------------------------------------------------------------
    @initialize(
        block_size=st.sampled_from([2, 4]),
        window=st.sampled_from([1, 6, 9, 64]),
        num_full=st.integers(10, 40),
        num_sliding=st.one_of(st.just(0), st.integers(4, 24)),
        prefix_caching=st.booleans(),
    )
    def setup(self, block_size: int, window: int, num_full: int, num_sliding: int, prefix_caching: bool) -> None:
        self.kv = KVCacheManager(block_size, num_full, num_sliding, window, enable_prefix_caching=prefix_caching)
        self.shadow = {FULL: [[None] * block_size for _ in range(num_full)],
                       SLIDING: [[None] * block_size for _ in range(num_sliding)]}

    @property
    def bs(self) -> int:
        assert self.kv is not None
        return self.kv.block_size

    @property
    def kinds(self) -> list[str]:
        assert self.kv is not None
        return self.kv.kinds

    def first_needed(self, next_position: int) -> int:
        assert self.kv is not None
        return max(0, next_position - self.kv.window + 1) // self.bs

    # -- model helpers --------------------------------------------------------------------------
    def holders(self, kind: str, block: int) -> int:
        """Live table entries referencing `block`, counted from the model's own view."""
        return sum(s.tables.table(kind).count(block) for s in self.running.values())

    def check_contents(self, seq: Seq) -> None:
        """Every block a sequence can read holds exactly its own token prefix."""
        tables, nc = seq.tables, seq.tables.num_computed
        for kind in self.kinds:
            table = tables.table(kind)
            for pos in range(nc):
                block = table[pos // self.bs]
                if block == NO_BLOCK:
                    assert kind == SLIDING and pos // self.bs < self.first_needed(nc)
                    continue
                assert self.shadow[kind][block][pos % self.bs] == tuple(seq.tokens[:pos + 1]), \
                    f"{kind} block {block} does not hold position {pos} of the sequence"

    def step(self, seq: Seq, num_new: int) -> list[BlockCopy] | None:
        """Scheduler + runner for one step of `num_new` positions; None when it does not fit."""
        kv, tables = self.kv, seq.tables
        assert kv is not None
        nc = tables.num_computed
        assert nc + num_new <= len(seq.tokens)
        needed = kv.blocks_needed(tables, num_new)
        fits = kv.can_append(tables, num_new)
        assert fits == all(kv.pools[k].num_free >= needed[k] for k in self.kinds)
        if not fits:
            event("step does not fit")
            return None
        # copies expected from the model: a partial tail that some other live table also holds
        expected_src = {}
        if nc % self.bs:
            for kind in self.kinds:
                tail = tables.table(kind)[-1]
                if tail != NO_BLOCK and self.holders(kind, tail) > 1:
                    expected_src[kind] = tail
        free_before = {k: kv.pools[k].num_free for k in self.kinds}
        copies = kv.append(tables, num_new)
        for k in self.kinds:
            assert free_before[k] - kv.pools[k].num_free == needed[k], "blocks_needed must be exact"
            assert len(tables.table(k)) == ceil_div(nc + num_new, self.bs)
        assert len(copies) == len(expected_src)
        if copies:
            event("copy-on-write")
        for c in copies:
            assert c.kind in expected_src and c.src == expected_src[c.kind]
            assert c.dst == tables.table(c.kind)[(nc - 1) // self.bs]  # the old partial tail's slot
            assert c.dst != c.src and kv.pools[c.kind].ref_count[c.dst] == 1
            self.shadow[c.kind][c.dst] = list(self.shadow[c.kind][c.src])
        for kind in self.kinds:  # the runner writes the new positions
            table = tables.table(kind)
            for pos in range(nc, nc + num_new):
                self.shadow[kind][table[pos // self.bs]][pos % self.bs] = tuple(seq.tokens[:pos + 1])
        kv.commit(tables, seq.tokens, nc + num_new)
        assert tables.num_computed == nc + num_new
        return copies

    def admit(self, seq: Seq, chunk: int) -> int | None:
        """match_prefix, then the first chunk if it fits (else give the hit back). Returns the hit."""
        kv = self.kv
        assert kv is not None
        assert not seq.tables.full and not seq.tables.sliding
        hit = kv.match_prefix(seq.tables, seq.tokens)
        assert hit % self.bs == 0 and 0 <= hit < len(seq.tokens), "a hit leaves at least one token"
        assert seq.tables.num_computed == hit and len(seq.tables.hashes) == hit // self.bs
        if not kv.enable_prefix_caching:
            assert hit == 0
        if hit:
            event("prefix hit")
        for kind in self.kinds:
            table = seq.tables.table(kind)
            assert len(table) == hit // self.bs
            if kind == SLIDING:  # only the window is attached
                first = self.first_needed(hit)
                assert all(b == NO_BLOCK for b in table[:first])
                assert all(b != NO_BLOCK for b in table[first:])
        self.running[self.next_id] = seq
        self.check_contents(seq)  # the cached blocks really hold this prefix
        num_new = min(chunk, len(seq.tokens) - hit)
        if self.step(seq, num_new) is None:
            del self.running[self.next_id]
            kv.free(seq.tables)
            assert seq.tables == BlockTables()
            return None
        self.next_id += 1
        return hit

    def sample_token(self, seq: Seq, token: int) -> None:
        """After the last pending position is computed the model yields one more token."""
        if seq.tables.num_computed == len(seq.tokens) and len(seq.tokens) < MAX_LEN:
            seq.tokens.append(token)

    def pick(self, pool: dict[int, Seq], index: int) -> tuple[int, Seq] | None:
        if not pool:
            return None
        key = sorted(pool)[index % len(pool)]
        return key, pool[key]

    # -- rules ----------------------------------------------------------------------------------
    @rule(tokens=st.lists(ALPHABET, min_size=1, max_size=24), chunk=st.integers(1, 24))
    def admit_new(self, tokens: list[int], chunk: int) -> None:
        self.admit(Seq(tokens), chunk)

    @rule(index=st.integers(0, 1 << 10), num_new=st.integers(1, 8), token=ALPHABET)
    def advance(self, index: int, num_new: int, token: int) -> None:
        picked = self.pick(self.running, index)
        if picked is None:
            return
        _, seq = picked
        pending = len(seq.tokens) - seq.tables.num_computed
        if pending == 0:  # reached MAX_LEN: nothing left to compute
            return
        if self.step(seq, min(num_new, pending)) is not None:
            self.sample_token(seq, token)

    @rule(index=st.integers(0, 1 << 10), step_child=st.booleans(), token=ALPHABET)
    def fork(self, index: int, step_child: bool, token: int) -> None:
        kv = self.kv
        assert kv is not None
        picked = self.pick(self.running, index)
        if picked is None:
            return
        _, parent = picked
        refs_before = {k: list(kv.pools[k].ref_count) for k in self.kinds}
        child = Seq(list(parent.tokens), kv.fork(parent.tables))
        assert child.tables == parent.tables and child.tables.full is not parent.tables.full
        for k in self.kinds:
            for b in set(parent.tables.table(k)) - {NO_BLOCK}:
                assert kv.pools[k].ref_count[b] == refs_before[k][b] + parent.tables.table(k).count(b)
        child_id = self.next_id
        self.running[child_id] = child
        self.next_id += 1
        nc = child.tables.num_computed
        if step_child and nc < len(child.tokens):
            copies = self.step(child, 1)
            if copies is not None:
                if nc % self.bs:  # the shared partial tail must be copied, in every pool
                    assert sorted(c.kind for c in copies) == sorted(self.kinds)
                    assert all(c.src == parent.tables.table(c.kind)[-1] for c in copies)
                else:
                    assert copies == []
                self.sample_token(child, token)

    @rule(index=st.integers(0, 1 << 10))
    def finish(self, index: int) -> None:
        assert self.kv is not None
        picked = self.pick(self.running, index)
        if picked is None:
            return
        key, seq = picked
        del self.running[key]
        self.kv.free(seq.tables)
        assert seq.tables == BlockTables()

    @rule(index=st.integers(0, 1 << 10))
    def preempt(self, index: int) -> None:
        assert self.kv is not None
        picked = self.pick(self.running, index)
        if picked is None:
            return
        key, seq = picked
        del self.running[key]
        seq.hashes_at_preempt = list(seq.tables.hashes)
        self.kv.free(seq.tables)
        assert seq.tables == BlockTables()
        self.preempted[key] = seq

    @rule(index=st.integers(0, 1 << 10), chunk=st.integers(1, 24))
    def readmit(self, index: int, chunk: int) -> None:
        kv = self.kv
        assert kv is not None
        picked = self.pick(self.preempted, index)
        if picked is None:
            return
        key, seq = picked
        # blocks of its computed prefix still cached (in each pool that needs them) must be hit
        hashes = seq.hashes_at_preempt[:(len(seq.tokens) - 1) // self.bs]
        expected = 0
        if kv.enable_prefix_caching:
            for h in range(len(hashes), 0, -1):
                full_ok = FULL not in self.kinds or all(kv.pools[FULL].lookup(x) is not None for x in hashes[:h])
                sliding_ok = SLIDING not in self.kinds or all(
                    kv.pools[SLIDING].lookup(x) is not None for x in hashes[self.first_needed(h * self.bs):h])
                if full_ok and sliding_ok:
                    expected = h * self.bs
                    break
        seq.tables = BlockTables()
        hit = self.admit(seq, chunk)
        if hit is None:
            seq.tables = BlockTables()
            return
        assert hit >= expected, f"surviving prefix of {expected} tokens not reused (hit {hit})"
        event(f"readmit: expected hit {'> 0' if expected else '0'}, hit {'> 0' if hit else '0'}")
        del self.preempted[key]

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def pools_consistent(self) -> None:
        kv = self.kv
        if kv is None:
            return
        for kind, pool in kv.pools.items():
            usage = kv.usage()[kind.name.lower()]
            refs = [0] * pool.num_blocks
            for seq in self.running.values():
                table = seq.tables.table(kind)
                live = [b for b in table if b != NO_BLOCK]
                assert len(live) == len(set(live)), f"a block twice in one {kind} table"
                for b in live:
                    refs[b] += 1
            assert pool.ref_count == refs
            assert list(pool.free) == list(dict.fromkeys(pool.free))
            assert set(pool.free) == {b for b in range(pool.num_blocks) if refs[b] == 0}
            assert usage["free"] == pool.num_free == len(pool.free)
            assert usage["free"] + usage["used"] == usage["total"] == pool.num_blocks
            assert {b: h for h, b in pool.block_of.items()} == {b: e.key for b, e in pool.cached.items()}
            if not kv.enable_prefix_caching:
                assert not pool.block_of

    @invariant()
    def tables_consistent(self) -> None:
        if self.kv is None:
            return
        for seq in self.running.values():
            t, nc = seq.tables, seq.tables.num_computed
            assert 0 < nc <= len(seq.tokens) <= MAX_LEN
            assert len(t.full) == (ceil_div(nc, self.bs) if FULL in self.kinds else 0)
            assert all(b != NO_BLOCK for b in t.full)
            assert len(t.hashes) == nc // self.bs
            if SLIDING in self.kinds:
                assert len(t.sliding) == ceil_div(nc, self.bs)
                first = self.first_needed(nc)
                assert all(b == NO_BLOCK for b in t.sliding[:first]), "sliding block kept out of the window"
                assert all(b != NO_BLOCK for b in t.sliding[first:]), "sliding block released too early"
            else:
                assert t.sliding == []
            self.check_contents(seq)

    def teardown(self) -> None:
        kv = self.kv
        if kv is None:
            return
        for seq in self.running.values():
            kv.free(seq.tables)
        for kind, pool in kv.pools.items():
            assert pool.num_free == pool.num_blocks, f"{kind} blocks leaked"
            assert not any(pool.ref_count)


KVCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestKVCacheMachine = KVCacheMachine.TestCase


# -- deterministic unit tests -------------------------------------------------------------------

def run(kv: KVCacheManager, tokens: list[int], num_new: int | None = None) -> BlockTables:
    """Admit `tokens` through the prefix cache and compute them (all, or `num_new` of them)."""
    tables = BlockTables()
    hit = kv.match_prefix(tables, tokens)
    num_new = len(tokens) - hit if num_new is None else num_new
    assert kv.can_append(tables, num_new)
    kv.append(tables, num_new)
    kv.commit(tables, tokens, hit + num_new)
    return tables


def test_prefix_hit_after_free_reattaches_window_only() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=16, num_sliding_blocks=16, window=6)
    tokens = list(range(14))
    a = run(kv, tokens)
    assert a.sliding[:2] == [NO_BLOCK, NO_BLOCK] and NO_BLOCK not in a.sliding[2:]  # released at commit
    full = list(a.full)
    kv.free(a)
    sliding_pool = kv.pools[SLIDING]
    # released sliding blocks keep their hash: a later prompt can still use them
    cached_sliding = [sliding_pool.lookup(h) for h in (e.key for e in kv.pools[FULL].cached.values())]
    assert None not in cached_sliding

    b = BlockTables()
    assert kv.match_prefix(b, tokens + [99, 98]) == 12
    assert b.full == full[:3] and b.num_computed == 12 and len(b.hashes) == 3
    # the next query (position 12) reads positions 7..12: blocks 1 and 2 only
    assert b.sliding[0] == NO_BLOCK and b.sliding[1:] == [sliding_pool.lookup(h) for h in b.hashes[1:]]
    assert all(kv.pools[FULL].ref_count[x] == 1 for x in b.full)
    kv.free(b)

    # the whole prompt cached: still one token is left to compute
    c = BlockTables()
    assert kv.match_prefix(c, tokens[:12]) == 8
    kv.free(c)
    assert kv.prefix_hits == 20 and kv.prefix_queries == 14 + 16 + 12


def test_prefix_cache_survives_only_as_long_as_blocks_are_not_reused() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=8, num_sliding_blocks=8, window=6)
    kv.free(run(kv, list(range(9))))
    kv.free(run(kv, [50 + i for i in range(32)]))  # every block of both pools reused
    assert kv.match_prefix(BlockTables(), list(range(9))) == 0


def test_prefix_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=16, num_sliding_blocks=16, window=6,
                        enable_prefix_caching=False)
    kv.free(run(kv, list(range(14))))
    tables = BlockTables()
    assert kv.match_prefix(tables, list(range(14))) == 0
    assert tables == BlockTables()


def test_hit_refused_when_sliding_blocks_evicted() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=64, num_sliding_blocks=8, window=6)
    tokens = list(range(14))
    a = run(kv, tokens)
    full_hashes = list(a.hashes)
    kv.free(a)
    # another sequence takes every sliding block (the cached ones last), few of the many full ones
    other = run(kv, [100 + i for i in range(32)])
    kv.free(other)
    assert all(kv.pools[FULL].lookup(h) is not None for h in full_hashes)  # full blocks still cached
    assert all(kv.pools[SLIDING].lookup(h) is None for h in full_hashes)
    tables = BlockTables()
    assert kv.match_prefix(tables, tokens) == 0
    assert tables.full == [] and tables.sliding == [] and tables.num_computed == 0


def test_hit_shortened_to_where_sliding_blocks_survive() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=64, num_sliding_blocks=10, window=6)
    tokens = list(range(22))  # 5 full blocks
    a = run(kv, tokens)
    full_hashes = list(a.hashes)
    assert len(full_hashes) == 5
    kv.free(a)
    # a live sequence holds sliding blocks 0 and 1 of the prefix (a hit of 2 blocks)
    holder = BlockTables()
    assert kv.match_prefix(holder, tokens[:8] + [7]) == 8
    # evict every other free sliding block
    filler = run(kv, [200 + i for i in range(kv.pools[SLIDING].num_free * 4)])
    assert all(kv.pools[SLIDING].lookup(h) is None for h in full_hashes[2:])
    assert all(kv.pools[FULL].lookup(h) is not None for h in full_hashes)
    tables = BlockTables()
    # 5 blocks need sliding blocks 3, 4; 4 need 2, 3; 3 need 1, 2; 2 need 0, 1: present
    assert kv.match_prefix(tables, tokens) == 8
    assert tables.full == holder.full and tables.sliding == holder.sliding
    for t in (tables, holder, filler):
        kv.free(t)
    assert all(p.num_free == p.num_blocks for p in kv.pools.values())


def test_evicting_oldest_sliding_block_keeps_full_hit() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=64, num_sliding_blocks=8, window=6)
    tokens = list(range(14))
    a = run(kv, tokens)
    hashes = list(a.hashes)
    kv.free(a)
    pool = kv.pools[SLIDING]
    # free order: unhashed blocks first, then cached blocks 0, 1, 2 (oldest first)
    uncached = sum(1 for b in pool.free if b not in pool.cached)
    filler = run(kv, [300 + i for i in range((uncached + 1) * 4)])
    assert pool.lookup(hashes[0]) is None and pool.lookup(hashes[1]) is not None
    tables = BlockTables()
    assert kv.match_prefix(tables, tokens) == 12  # the window only needs sliding blocks 1 and 2
    assert tables.sliding[0] == NO_BLOCK
    kv.free(tables)
    kv.free(filler)


def test_fork_copy_on_write_of_partial_tail() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=16, num_sliding_blocks=16, window=6)
    tokens = list(range(7))
    parent = run(kv, tokens, 6)  # positions 4, 5 sit in a partial block
    child = kv.fork(parent)
    assert child == parent
    for kind in (FULL, SLIDING):
        assert kv.pools[kind].ref_count[parent.table(kind)[-1]] == 2
    assert kv.blocks_needed(child, 1) == {FULL: 1, SLIDING: 1}
    tails = {k: parent.table(k)[-1] for k in (FULL, SLIDING)}
    copies = kv.append(child, 1)
    assert {(c.kind, c.src) for c in copies} == {(FULL, tails[FULL]), (SLIDING, tails[SLIDING])}
    assert all(child.table(c.kind)[-1] == c.dst != c.src for c in copies)
    assert child.full[:-1] == parent.full[:-1]  # full blocks stay shared
    # the parent now holds its tail alone: no copy for it
    assert kv.blocks_needed(parent, 1) == {FULL: 0, SLIDING: 0}
    assert kv.append(parent, 1) == []
    assert parent.table(FULL)[-1] == tails[FULL]
    kv.free(parent)
    kv.free(child)
    assert all(p.num_free == p.num_blocks for p in kv.pools.values())


def test_fork_on_block_boundary_needs_no_copy() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=16, num_sliding_blocks=16, window=6)
    parent = run(kv, list(range(9)), 8)
    child = kv.fork(parent)
    assert kv.append(child, 1) == []
    assert child.full[:2] == parent.full and len(child.full) == 3


def test_can_append_counts_reserve_on_full_pool() -> None:
    kv = KVCacheManager(block_size=4, num_full_blocks=4, num_sliding_blocks=8, window=6)
    tables = BlockTables()
    assert kv.blocks_needed(tables, 9) == {FULL: 3, SLIDING: 3}
    assert kv.can_append(tables, 9, reserve=1)
    assert not kv.can_append(tables, 9, reserve=2)
    assert not kv.can_append(tables, 17)


def test_release_below_zero_raises() -> None:
    pool = BlockPool(4)
    with pytest.raises(RuntimeError):
        pool.release(0)
    block = pool.allocate()
    pool.retain(block)
    pool.release(block)
    pool.release(block)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.release(block)
    assert pool.ref_count[block] == 0 and pool.num_free == 4


def test_allocate_from_empty_pool_raises() -> None:
    pool = BlockPool(2)
    pool.allocate()
    pool.allocate()
    with pytest.raises(RuntimeError):
        pool.allocate()


@pytest.mark.parametrize("block_size", [0, -4, 3, 6, 12])
def test_block_size_must_be_power_of_two(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(block_size, 8, 8, window=6)


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_power_of_two_block_size_accepted(block_size: int) -> None:
    assert KVCacheManager(block_size, 8, 8, window=6).block_size == block_size


def test_colliding_keys_never_serve_another_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every block key forced equal (a total hash collision), a hit is still only a block that
    holds exactly the same tokens after exactly the same parent."""
    import stepflash.engine.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "block_key", lambda parent, tokens: b"same")
    kv = KVCacheManager(4, 20, 0, 64)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    tables = BlockTables()
    kv.append(tables, len(a))
    kv.commit(tables, a, len(a))  # caches block 0 ([1, 2, 3, 4]) under the one key
    kv.free(tables)
    for tokens, expected in [([9, 2, 3, 4, 5], 0),  # another first block
                             ([1, 2, 3, 4, 1, 2, 3, 4, 0], 4),  # block 1 has block 0's tokens, not its parent
                             ([1, 2, 3, 4, 5, 6, 7, 8, 0], 4)]:  # block 1 was never cached (key taken)
        probe = BlockTables()
        assert kv.match_prefix(probe, tokens) == expected, tokens
        kv.free(probe)


def test_image_keys_separate_blocks_of_equal_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of the same placeholder ids holding different images never share KV (also with every
    block key forced equal: the lookup compares the image keys); the same image does."""
    import stepflash.engine.kv_cache as kv_cache
    from types import SimpleNamespace

    def image(key: bytes):
        return SimpleNamespace(start=0, end=4, image=SimpleNamespace(key=key))

    ids = [9, 9, 9, 9, 1, 2, 3, 4, 5]
    for collide in (False, True):
        if collide:
            monkeypatch.setattr(kv_cache, "block_key", lambda parent, tokens: b"same")
        kv = KVCacheManager(4, 20, 0, 64)
        tables = BlockTables()
        kv.append(tables, len(ids))
        kv.commit(tables, ids, len(ids), [image(b"cat")])
        kv.free(tables)
        for key, expected in [(b"dog", 0), (b"cat", 4 if collide else 8)]:  # colliding: block 1's key is taken
            probe = BlockTables()
            assert kv.match_prefix(probe, ids, [image(key)]) == expected, (collide, key)
            kv.free(probe)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_gpu_memory_utilization_outside_0_1_is_refused_by_name(share: float) -> None:
    from stepflash.config import EngineConfig

    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=share)


def test_gpu_memory_utilization_sizes_the_default_gpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without kv_cache_bytes, a GPU's KV cache is that share of its free memory (the planner asks
    torch how much is free: here a card with 256 MiB free)."""
    import torch

    from stepflash.config import EngineConfig, ModelConfig
    from stepflash.engine.kv_cache import kv_bytes_per_block, plan_kv_layout
    from stepflash.train.configs import tiny_config

    free = 256 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    cfg = ModelConfig.from_dict(tiny_config())
    full_layers = [s.index for s in cfg.decoder_layers if not s.sliding_window]
    per_block = kv_bytes_per_block(cfg, full_layers, 16, torch.float32)
    blocks = {share: plan_kv_layout(cfg, EngineConfig(gpu_memory_utilization=share), 0, torch.float32,
                                    torch.device("cuda")).num_blocks[FULL] for share in (0.3, 0.9)}
    for share, n in blocks.items():  # the sliding layers' fixed part aside, the full layers get the rest
        assert share * free - 2 * free // 10 < n * per_block <= share * free
    assert blocks[0.9] > 2 * blocks[0.3]
