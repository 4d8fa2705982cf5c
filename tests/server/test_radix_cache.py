"""The radix tree's bookkeeping: match, insert, split, lock, LRU eviction."""

from __future__ import annotations

import torch
from radixserve.engine.radix_cache import RadixCache


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
