"""A token-granular radix tree from token-id prefixes to the KV slots that hold them.

Owns the cached slots (see the ownership rule in `prefix_cache.py`): each node holds an edge of
tokens and one slot per token; the path from the root to a node spells a prefix, and the slots
along it are that prefix's KV. Pure bookkeeping, no tensors.

- `match` walks the longest cached prefix (splitting an edge where the prefix ends inside it, so
  every hit ends at a node: its handle).
- `lock` / `unlock` count references on the handle's node and every ancestor, so a running
  request's prefix is never evicted; locks stack (two requests on one prefix lock it twice).
- `insert` walks the tokens: where the tree has them already, the given slots are either the
  tree's own (a request's prefix hit) or duplicates, which go back to the allocator; the rest
  becomes a new leaf that takes the slots.
- `evict` frees unlocked leaves, least recently used first; the last one may lose only its tail
  (the tree is token granular, so eviction frees exactly what was asked when it can).

Invariants (`check_integrity`): an edge has as many slots as tokens, children are keyed by the
first token of their edge, a node's reference count is at least the sum of its children's, the
leaf set and the counters match the tree.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kestrel.kvcache.allocator import SlotAllocator
from kestrel.kvcache.prefix_cache import EMPTY_HIT, PrefixHit


class _Node:
    __slots__ = ("key", "slots", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: list[int], slots: list[int], parent: _Node | None) -> None:
        self.key = key
        """Tokens on the edge from the parent (empty only for the root)."""
        self.slots = slots
        """One KV slot per token of `key`."""
        self.parent = parent
        self.children: dict[int, _Node] = {}
        """By the first token of the child's edge."""
        self.lock_ref = 0
        """Locks on this node or any node below it."""
        self.last_access = 0


class RadixCache:
    keeps_inserts = True

    def __init__(self, allocator: SlotAllocator) -> None:
        self._allocator = allocator
        self._root = _Node([], [], None)
        self._root.lock_ref = 1  # never evicted
        self._leaves: set[_Node] = set()
        """Every node without children except the root."""
        self._num_cached = 0
        self._num_locked = 0
        """Cached slots in nodes with lock_ref > 0."""
        self._clock = 0

    # ---- the PrefixCache interface ------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        node, num_tokens, slots = self._walk(token_ids)
        return EMPTY_HIT if num_tokens == 0 else PrefixHit(num_tokens, slots, node)

    def lock(self, handle: object) -> None:
        node = _node(handle)
        while node is not None:
            if node.lock_ref == 0:
                self._num_locked += len(node.slots)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: object) -> None:
        node = _node(handle)
        while node is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("RadixCache.unlock without a matching lock")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._num_locked -= len(node.slots)
            node = node.parent

    def insert(self, token_ids: Sequence[int], slots: Sequence[int]) -> PrefixHit:
        if len(token_ids) != len(slots):
            raise ValueError(f"insert: {len(token_ids)} tokens but {len(slots)} slots")
        node, i, path_slots = self._walk(token_ids)
        # The walk matched [0, i): the tree's slots; the given ones that differ are duplicates.
        duplicates = [given for own, given in zip(path_slots, slots[:i]) if own != given]
        if duplicates:
            self._allocator.free(duplicates)
        if i < len(token_ids):
            node = self._add_leaf(node, list(token_ids[i:]), list(slots[i:]))
            path_slots.extend(node.slots)
        return EMPTY_HIT if not token_ids else PrefixHit(len(token_ids), path_slots, node)

    def evict(self, num_slots: int) -> int:
        if num_slots <= 0:
            return 0
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_slots:
            _, _, leaf = heapq.heappop(heap)
            want = num_slots - freed
            if want < len(leaf.slots):  # only the tail: the edge keeps its first token
                self._allocator.free(leaf.slots[-want:])
                del leaf.key[-want:], leaf.slots[-want:]
                self._num_cached -= want
                return num_slots
            freed += len(leaf.slots)
            parent = self._remove_leaf(leaf)
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    @property
    def num_cached_slots(self) -> int:
        return self._num_cached

    @property
    def num_evictable_slots(self) -> int:
        return self._num_cached - self._num_locked

    def cached_slots(self) -> list[int]:
        out: list[int] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            out.extend(node.slots)
            stack.extend(node.children.values())
        return out

    def check_integrity(self) -> None:
        num_cached = num_locked = 0
        leaves = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            assert len(node.key) == len(node.slots), "a node has more tokens than slots, or fewer"
            assert node is self._root or node.key, "a node below the root has an empty edge"
            num_cached += len(node.slots)
            num_locked += len(node.slots) if node.lock_ref > 0 else 0
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), \
                "a node has fewer locks than its children"
            for first, child in node.children.items():
                assert child.parent is node and child.key[0] == first, "a child is filed under the wrong token"
            if not node.children and node is not self._root:
                leaves.add(node)
            stack.extend(node.children.values())
        assert leaves == self._leaves, "the leaf set does not match the tree"
        assert num_cached == self._num_cached, "the cached-slot count does not match the tree"
        assert num_locked == self._num_locked, "the locked-slot count does not match the tree"

    # ---- helpers ---------------------------------------------------------------
    def _walk(self, token_ids: Sequence[int]) -> tuple[_Node, int, list[int]]:
        """Follow the longest cached prefix: (its last node, its length, its slots); touches the path."""
        self._clock += 1
        node, i, slots = self._root, 0, []
        n = len(token_ids)
        while i < n:
            child = node.children.get(token_ids[i])
            if child is None:
                break
            k = _common_len(child.key, token_ids, i)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = self._clock
            slots.extend(child.slots)
            node, i = child, i + k
        return node, i, slots

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node`'s edge after k tokens; the new upper node (returned) inherits its locks."""
        parent = node.parent
        assert parent is not None and 0 < k < len(node.key)
        upper = _Node(node.key[:k], node.slots[:k], parent)
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        node.key, node.slots = node.key[k:], node.slots[k:]
        node.parent = upper
        upper.children[node.key[0]] = node
        parent.children[upper.key[0]] = upper
        return upper

    def _add_leaf(self, parent: _Node, key: list[int], slots: list[int]) -> _Node:
        leaf = _Node(key, slots, parent)
        leaf.last_access = self._clock
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._num_cached += len(slots)
        return leaf

    def _remove_leaf(self, leaf: _Node) -> _Node:
        """Free an unlocked leaf's slots and drop it; returns its parent."""
        parent = leaf.parent
        assert parent is not None and leaf.lock_ref == 0 and not leaf.children
        self._allocator.free(leaf.slots)
        self._num_cached -= len(leaf.slots)
        del parent.children[leaf.key[0]]
        self._leaves.discard(leaf)
        if not parent.children and parent is not self._root:
            self._leaves.add(parent)
        return parent


def _node(handle: object) -> _Node | None:
    if handle is not None and not isinstance(handle, _Node):
        raise TypeError(f"not a RadixCache handle: {handle!r}")
    return handle


def _common_len(key: list[int], token_ids: Sequence[int], start: int) -> int:
    """How many leading tokens of `key` equal token_ids[start:]."""
    n = min(len(key), len(token_ids) - start)
    if token_ids[start:start + n] == key[:n]:  # the usual case, compared in C
        return n
    i = 0
    while i < n and key[i] == token_ids[start + i]:
        i += 1
    return i
