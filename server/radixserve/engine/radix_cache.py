"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV slots.

Bookkeeping is explicit: every cached token is either `protected` (on the path of a running
request, lock_ref > 0, never evicted) or `evictable` (unreferenced; leaves go first, least
recently used first). Slots leave the tree only through `evict`, which hands them back to
the pool.

The cache owns the request protocol too: `cache_unfinished` (a prompt finished prefilling:
share it, move the request's lock down to it) and `cache_finished` (the request lets go of
its KV: insert it, free the duplicates, unlock). `NoPrefixCache` has the same methods for
`--disable-radix-cache`, so the scheduler never asks whether caching is on.

Namespaces: every key lives under a hashable `namespace` (None, the default, is the base
model); each namespace has its own root, so two requests share a prefix only when both
their tokens and their namespace agree. The namespace is a generic key, not a LoRA notion:
the adapter name is one (KV computed under an adapter differs from the base model's), and a
per-request salt can be folded into the same key. Eviction stays global across namespaces
(one `evictable_leaves` set), and an emptied namespace's root is dropped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Protocol

import torch

_clock = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> None:
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = next(_clock)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


class RootNode(TreeNode):
    """A namespace's root: never evicted (lock_ref 1), knows its namespace to drop it."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: Hashable) -> None:
        super().__init__([], _no_slots(), None)
        self.namespace = namespace
        self.lock_ref = 1


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _no_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


class CachedReq(Protocol):
    """What the cache reads and rewrites on a request: its tokens and the KV slots they use.

    `slots[:prefix_len]` belong to the tree (locked through `last_node`); the rest are the
    request's own until the cache takes them.
    """

    slots: torch.Tensor
    prefix_len: int
    last_node: TreeNode | None
    cache_namespace: Hashable

    @property
    def fill_ids(self) -> list[int]: ...


class RadixCache:
    reuses_prefixes = True

    def __init__(self, free_slots: Callable[[torch.Tensor], None]) -> None:
        self._free_slots = free_slots
        self.reset()

    def reset(self) -> None:
        self.roots: dict[Hashable, RootNode] = {}
        self.evictable_size = 0
        self.protected_size = 0
        # unlocked childless nodes: what `evict` may take, kept so it never walks the tree
        self.evictable_leaves: set[TreeNode] = set()

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    @property
    def root(self) -> RootNode:
        """The default (base model) namespace's root."""
        return self._root(None)

    def _root(self, namespace: Hashable) -> RootNode:
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = RootNode(namespace)
        return root

    def match_prefix(
        self, key: list[int], namespace: Hashable = None
    ) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest prefix of `key` cached in `namespace`, and the node where it
        ends (a namespace root, which locking ignores, when nothing matched)."""
        node = self.roots.get(namespace) or RootNode(namespace)
        values = []
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            values.append(child.value)
            node, key = child, key[n:]
        slots = torch.cat(values) if values else _no_slots()
        return slots, node

    def insert(self, key: list[int], value: torch.Tensor, namespace: Hashable = None) -> int:
        """Cache `value` (slots) for `key` in `namespace`; returns how many leading tokens
        were cached already.

        The caller still owns `value[:returned]` and must free those duplicate slots.
        """
        assert len(key) == value.numel()
        node, done = self._root(namespace), 0
        while done < len(key):
            child = node.children.get(key[done])
            if child is None:
                leaf = TreeNode(key[done:], value[done:].clone(), node)
                node.children[key[done]] = leaf
                self.evictable_size += len(leaf.key)
                self.evictable_leaves.discard(node)
                self.evictable_leaves.add(leaf)
                return done
            n = _common_len(child.key, key[done:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            node, done = child, done + n
        return done

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after n tokens; the new upper node keeps child's lock count."""
        parent = child.parent
        assert parent is not None
        upper = TreeNode(child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node.parent is not None:  # up to its namespace's root
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
                self.evictable_leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
                if not node.children:
                    self.evictable_leaves.add(node)
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unbalanced dec_lock_ref"
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unreferenced leaves, LRU first; returns freed."""
        leaves = list(self.evictable_leaves)
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.evictable_leaves.remove(leaf)
            self._free_slots(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent.children:
                continue
            if isinstance(parent, RootNode):
                del self.roots[parent.namespace]
            elif parent.lock_ref == 0:
                self.evictable_leaves.add(parent)
                heapq.heappush(leaves, parent)
        return freed

    # ---- the request protocol ----------------------------------------------------------
    def _insert_req(self, req: CachedReq) -> list[int]:
        """Put the request's computed tokens in the tree and free its duplicate slots."""
        key = req.fill_ids[: req.slots.numel()]
        dup = self.insert(key, req.slots, req.cache_namespace)
        self._free_slots(req.slots[req.prefix_len : dup])
        return key

    def cache_unfinished(self, req: CachedReq) -> None:
        """Its prompt is in: share it so later requests reuse it, and hold it locked."""
        key = self._insert_req(req)
        slots, node = self.match_prefix(key, req.cache_namespace)
        self.inc_lock_ref(node)
        self.dec_lock_ref(req.last_node)
        req.slots, req.prefix_len, req.last_node = slots, slots.numel(), node

    def cache_finished(self, req: CachedReq) -> None:
        """The request lets go of its KV (finished or retracted): the tree keeps it, unlocked."""
        if req.last_node is not None:
            self._insert_req(req)
            self.dec_lock_ref(req.last_node)
        else:
            self._free_slots(req.slots)
        req.slots, req.prefix_len, req.last_node = _no_slots(), 0, None


class NoPrefixCache:
    """The cache for `--disable-radix-cache`: same methods, nothing kept, nothing shared."""

    reuses_prefixes = False
    evictable_size = 0
    protected_size = 0

    def __init__(self, free_slots: Callable[[torch.Tensor], None]) -> None:
        self._free_slots = free_slots

    def reset(self) -> None:
        pass

    def match_prefix(self, key: list[int], namespace: Hashable = None) -> tuple[torch.Tensor, None]:
        return _no_slots(), None

    def inc_lock_ref(self, node: None) -> None:
        pass

    def dec_lock_ref(self, node: None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def cache_unfinished(self, req: CachedReq) -> None:
        pass

    def cache_finished(self, req: CachedReq) -> None:
        self._free_slots(req.slots)
        req.slots, req.prefix_len, req.last_node = _no_slots(), 0, None
