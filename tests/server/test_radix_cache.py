"""The radix tree's bookkeeping: match, insert, split, lock, LRU eviction, and the
request protocol (cache_unfinished / cache_finished) under random lifecycles."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from radixserve.engine.radix_cache import NoPrefixCache, RadixCache, TreeNode


def slots(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


class Freed:
    def __init__(self) -> None:
        self.slots: list[int] = []

    def __call__(self, t: torch.Tensor) -> None:
        self.slots += t.tolist()


def test_insert_then_match_returns_the_slots():
    tree = RadixCache(Freed())
    assert tree.insert([1, 2, 3], slots(10, 11, 12)) == 0
    got, node = tree.match_prefix([1, 2, 3, 4])
    assert got.tolist() == [10, 11, 12]
    assert node.key == [1, 2, 3]
    assert tree.evictable_size == 3 and tree.protected_size == 0


def test_insert_reports_already_cached_prefix_and_splits():
    tree = RadixCache(Freed())
    tree.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    # shares [1, 2]: the caller's first two slots are duplicates it must free
    assert tree.insert([1, 2, 7], slots(20, 21, 22)) == 2
    assert tree.total_size == 5
    assert sorted(tree.root.children[1].children) == [3, 7]
    assert tree.match_prefix([1, 2, 7])[0].tolist() == [10, 11, 22]
    assert tree.match_prefix([1, 2, 3, 4])[0].tolist() == [10, 11, 12, 13]


def test_match_splits_node_in_the_middle():
    tree = RadixCache(Freed())
    tree.insert([5, 6, 7, 8], slots(1, 2, 3, 4))
    got, node = tree.match_prefix([5, 6, 9])
    assert got.tolist() == [1, 2]
    assert node.key == [5, 6]
    assert list(node.children.values())[0].key == [7, 8]
    assert tree.total_size == 4


def test_no_match():
    tree = RadixCache(Freed())
    tree.insert([1, 2], slots(1, 2))
    got, node = tree.match_prefix([3, 4])
    assert got.numel() == 0 and node is tree.root


def test_locked_prefix_is_never_evicted():
    freed = Freed()
    tree = RadixCache(freed)
    tree.insert([1, 2, 3], slots(1, 2, 3))
    tree.insert([1, 2, 4, 5], slots(1, 2, 6, 7))
    _, node = tree.match_prefix([1, 2, 3])
    tree.inc_lock_ref(node)
    assert tree.protected_size == 3  # [1, 2] and [3]
    assert tree.evictable_size == 2  # [4, 5]
    assert tree.evict(100) == 2
    assert sorted(freed.slots) == [6, 7]
    assert tree.match_prefix([1, 2, 3])[0].tolist() == [1, 2, 3]
    tree.dec_lock_ref(node)
    assert tree.protected_size == 0 and tree.evictable_size == 3
    assert tree.evict(100) == 3
    assert sorted(freed.slots) == [1, 2, 3, 6, 7]
    assert tree.total_size == 0 and not tree.root.children


def test_evicts_least_recently_used_leaf_first():
    freed = Freed()
    tree = RadixCache(freed)
    tree.insert([1, 1], slots(1, 2))
    tree.insert([2, 2], slots(3, 4))
    tree.insert([3, 3], slots(5, 6))
    tree.match_prefix([1, 1])  # touch: now [2, 2] is the oldest
    assert tree.evict(1) == 2
    assert freed.slots == [3, 4]
    assert tree.match_prefix([2, 2])[0].numel() == 0
    assert tree.match_prefix([1, 1])[0].numel() == 2


def test_evicting_a_leaf_makes_its_parent_evictable():
    freed = Freed()
    tree = RadixCache(freed)
    tree.insert([1, 2, 3], slots(1, 2, 3))
    tree.insert([1, 2, 4], slots(1, 2, 4))
    assert tree.evict(3) == 4  # both leaves (1 + 1), then the shared [1, 2]
    assert sorted(freed.slots) == [1, 2, 3, 4]
    assert tree.total_size == 0


def test_split_keeps_lock_counts():
    tree = RadixCache(Freed())
    tree.insert([1, 2, 3, 4], slots(1, 2, 3, 4))
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.inc_lock_ref(node)
    tree.match_prefix([1, 2, 9])  # splits the locked node
    assert tree.protected_size == 4 and tree.evictable_size == 0
    tree.dec_lock_ref(node)
    assert tree.protected_size == 0 and tree.evictable_size == 4


# ---- the request protocol, under random request lifecycles (hypothesis) -----------------

POOL_SIZE = 24


def test_namespaces_share_prefixes_within_and_never_across():
    tree = RadixCache(Freed())
    tree.insert([1, 2, 3], slots(10, 11, 12))
    tree.insert([1, 2, 3], slots(20, 21, 22), namespace="sql")
    assert tree.insert([1, 2, 9], slots(30, 31, 32), namespace="sql") == 2
    assert tree.match_prefix([1, 2, 3, 4])[0].tolist() == [10, 11, 12]
    assert tree.match_prefix([1, 2, 3, 4], "sql")[0].tolist() == [20, 21, 22]
    assert tree.match_prefix([1, 2, 9], "sql")[0].tolist() == [20, 21, 32]
    got, node = tree.match_prefix([1, 2, 3], ("chat", "salt"))
    assert got.numel() == 0 and node.parent is None
    assert tree.evictable_size == 7


def test_eviction_is_global_lru_across_namespaces_and_drops_empty_roots():
    freed = Freed()
    tree = RadixCache(freed)
    tree.insert([1, 1], slots(1, 2), namespace="a")
    tree.insert([2, 2], slots(3, 4))
    tree.insert([3, 3], slots(5, 6), namespace="b")
    _, node = tree.match_prefix([3, 3], "b")
    tree.inc_lock_ref(node)
    assert tree.protected_size == 2
    assert tree.evict(2) == 2 and freed.slots == [1, 2]  # the oldest, in namespace "a"
    assert "a" not in tree.roots and None in tree.roots
    assert tree.evict(100) == 2  # base's leaf; "b" is locked
    assert sorted(freed.slots) == [1, 2, 3, 4]
    tree.dec_lock_ref(node)
    assert tree.evict(100) == 2 and tree.roots == {}


@dataclass
class FakeReq:
    """The fields the cache reads and rewrites, as the scheduler's Req has them."""

    fill_ids: list[int]
    slots: torch.Tensor = field(default_factory=lambda: slots())
    prefix_len: int = 0
    last_node: TreeNode | None = None
    cache_namespace: str | None = None


class Lifecycle:
    """A slot pool, a cache over it, and requests admitted and released the scheduler's way."""

    def __init__(self, cache_cls) -> None:
        self.free = list(range(POOL_SIZE))
        self.locked_slots: set[int] = set()
        self.cache = cache_cls(self._free)
        self.live: list[FakeReq] = []

    def _free(self, t: torch.Tensor) -> None:
        freed = t.tolist()
        if isinstance(self.cache, RadixCache):
            assert not set(freed) & self._locked(), "freed a slot of a locked node"
        self.free += freed

    def _locked(self) -> set[int]:
        return {s for r in self.live for s in r.slots[: r.prefix_len].tolist()}

    def _alloc(self, n: int) -> torch.Tensor | None:
        if len(self.free) < n:
            self.cache.evict(n - len(self.free))
        if len(self.free) < n:
            return None
        out, self.free = self.free[:n], self.free[n:]
        return slots(*out)

    def admit(self, ids: list[int], namespace: str | None = None) -> None:
        req = FakeReq(ids, cache_namespace=namespace)
        prefix, node = self.cache.match_prefix(ids[:-1], namespace)
        self.cache.inc_lock_ref(node)
        new = self._alloc(len(ids) - prefix.numel())
        if new is None:
            self.cache.dec_lock_ref(node)
            return
        req.slots, req.prefix_len, req.last_node = torch.cat([prefix, new]), prefix.numel(), node
        self.cache.cache_unfinished(req)
        self.live.append(req)

    def decode(self, i: int, tok: int) -> None:
        req = self.live[i % len(self.live)]
        new = self._alloc(1)
        if new is not None:
            req.fill_ids = req.fill_ids + [tok]
            req.slots = torch.cat([req.slots, new])

    def finish(self, i: int) -> None:
        self.cache.cache_finished(self.live.pop(i % len(self.live)))

    def check(self) -> None:
        """Every slot is held exactly once: free, in one tree node, or by one request."""
        held = list(self.free)
        nodes = []
        if isinstance(self.cache, RadixCache):
            nodes = [n for root in self.cache.roots.values() for n in _walk(root)]
        for n in nodes:
            held += n.value.tolist()
        for r in self.live:
            held += r.slots[r.prefix_len :].tolist()
        assert sorted(held) == list(range(POOL_SIZE))
        if not nodes:
            return
        # each node is locked once per live request whose path runs through it
        for n in nodes:
            users = sum(1 for r in self.live if _on_path(n, r.last_node))
            assert n.lock_ref == users
        tree = self.cache
        assert tree.protected_size == sum(len(n.key) for n in nodes if n.lock_ref)
        assert tree.evictable_size == sum(len(n.key) for n in nodes if not n.lock_ref)
        assert tree.evictable_leaves == {n for n in nodes if not n.children and not n.lock_ref}


def _walk(root: TreeNode):
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def _on_path(node: TreeNode, leaf: TreeNode | None) -> bool:
    while leaf is not None:
        if leaf is node:
            return True
        leaf = leaf.parent
    return False


tokens_ = st.lists(st.integers(0, 3), min_size=1, max_size=8)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), tokens_, st.sampled_from([None, "a", "b"])),
        st.tuples(st.just("decode"), st.integers(0, 7), st.integers(0, 3)),
        st.tuples(st.just("finish"), st.integers(0, 7)),
        st.tuples(st.just("evict"), st.integers(0, POOL_SIZE)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("cache_cls", [RadixCache, NoPrefixCache])
@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_random_lifecycles_hold_every_slot_once_and_never_evict_a_locked_node(cache_cls, ops):
    life = Lifecycle(cache_cls)
    for op, *args in ops:
        if op == "admit":
            life.admit(*args)
        elif op == "evict":
            life.cache.evict(*args)
        elif life.live:
            getattr(life, op)(*args)
        life.check()
    while life.live:
        life.finish(0)
    life.check()
    assert life.cache.protected_size == 0
    assert len(life.free) + life.cache.evictable_size == POOL_SIZE
    if cache_cls is RadixCache:
        life.cache.evict(POOL_SIZE)
        assert life.cache.roots == {}  # emptied namespaces leave no root behind
