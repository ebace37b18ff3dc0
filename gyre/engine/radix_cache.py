"""Radix prefix cache: token-id prefixes -> KV-cache page ids, at page granularity. Pure Python.

Invariants (check_integrity verifies each):
- One tree per weight version; KV computed under one version is never matched for another.
- A non-root node's key is a non-empty tuple of token ids, a multiple of page_size long, and
  node.pages[i] holds the KV of key[i*ps:(i+1)*ps]. A node's path is the keys from the root down to it.
- Children are keyed by their first page's tokens, so siblings differ in their first page.
- lock_ref(n) = num_locks(n) + sum(lock_ref(c) for children c): the outstanding lock() calls on n or
  on any descendant. Nodes with lock_ref > 0 (a locked node and all its ancestors) are never evicted.
- last_access(parent) >= last_access(child): a path is always touched from the root down.
- The tree of any version other than the current one holds only locked nodes: set_version frees the
  rest, and each later unlock frees the nodes it leaves unlocked.

Ownership: the cache owns every page in the tree and hands it back through free_pages exactly once.
A node handle keeps its meaning (the same path) across splits, since a split inserts the new node
above it; a handle is invalidated only by eviction, which cannot happen while it is locked.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False, repr=False, slots=True)
class TreeNode:
    """A run of whole pages of tokens below its parent, and the KV pages that hold them."""

    key: tuple[int, ...]  # token ids, a multiple of page_size long; () only for a root
    pages: list[int]  # pages[i] holds the KV of key[i*ps:(i+1)*ps]
    parent: TreeNode | None
    version: int
    children: dict[tuple[int, ...], TreeNode] = field(default_factory=dict)  # by first page's tokens
    lock_ref: int = 0  # lock() calls outstanding on this node or any descendant
    num_locks: int = 0  # lock() calls outstanding on this node itself
    last_access: int = 0
    evicted: bool = False

    @property
    def is_root(self) -> bool:
        return not self.key

    def __repr__(self) -> str:
        key, pages = list(self.key[:6]), self.pages[:4]
        return f"TreeNode(v{self.version}, {len(self.key)} tokens {key}, pages {pages}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    pages: list[int]  # pages covering the matched prefix, in order
    num_tokens: int  # len(pages) * page_size
    node: TreeNode  # deepest matched node, covering exactly the match (a root if nothing matched)


def _check(cond: object, msg: str, *args: object) -> None:
    if not cond:  # not `assert`: the check must also run under python -O. Formats only on failure.
        raise AssertionError(msg.format(*args))


class RadixCache:
    """Maps page-aligned token prefixes to KV pages; LRU eviction of unlocked leaves.

    free_pages(pages) is called with pages the cache evicts or flushes; it must not call back into
    the cache. version=None in match_prefix/insert means the current version (set_version).
    """

    def __init__(self, page_size: int, free_pages: Callable[[list[int]], None]) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._free_pages = free_pages
        self._version = 0
        self._roots: dict[int, TreeNode] = {0: TreeNode((), [], None, 0)}
        self._pages: set[int] = set()  # every page owned by the tree, all versions
        self._num_evictable = 0  # pages in nodes with lock_ref == 0
        self._num_nodes = 0  # non-root nodes, all versions
        self._clock = 0  # bumped once per match_prefix/insert; the LRU time
        # Candidate evictable leaves as (last_access at push, seq, node). NOTE: every evictable leaf of
        # the current tree has an entry whose time is <= its last_access; entries that went stale are
        # dropped or re-pushed on pop (times only grow, so the stored time is a lower bound).
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._seq = 0

    @property
    def version(self) -> int:
        return self._version

    @property
    def num_cached_pages(self) -> int:
        return len(self._pages)

    @property
    def num_evictable_pages(self) -> int:
        return self._num_evictable

    def cached_pages(self) -> set[int]:
        """All pages owned by the tree (every version)."""
        return set(self._pages)

    def match_prefix(self, token_ids: Sequence[int], version: int | None = None) -> MatchResult:
        """Longest cached prefix of token_ids made of whole pages; touches (LRU) the matched path.

        Splits a node when the match ends inside it, so result.node covers exactly result.pages.
        The pages stay the cache's: lock(result.node) before using them across an evict.
        """
        self._clock += 1
        root = self._root(self._version if version is None else version)
        node, pages = self._walk(root, token_ids, len(token_ids) // self.page_size)
        return MatchResult(pages, len(pages) * self.page_size, node)

    def insert(
        self, token_ids: Sequence[int], pages: Sequence[int], version: int | None = None
    ) -> tuple[TreeNode, int]:
        """Caches token_ids[:len(pages)*page_size] with pages; returns (node, num_pages_already_cached).

        The first n = num_pages_already_cached pages are cached already: the tree keeps its own pages
        there, and each pages[i] (i < n) that is not the tree's page stays the caller's to free. So a
        request that matched and locked m pages at admission frees pages[m:n] after this call. The
        tree takes ownership of pages[n:]. For the current version, node covers all of `pages`; for any
        other version nothing new is cached (pages[n:] are freed at once through free_pages) and node
        is the deepest node already there. Raises ValueError if a page passed in is repeated, or is
        the tree's at another position.
        """
        ps = self.page_size
        if len(token_ids) < len(pages) * ps:
            raise ValueError(
                f"insert: {len(pages)} pages need {len(pages) * ps} tokens, got {len(token_ids)}"
            )
        if len(set(pages)) != len(pages):
            raise ValueError(f"insert: repeated page in {list(pages)}")
        version = self._version if version is None else version
        self._clock += 1
        node, tree_pages = self._walk(self._root(version), token_ids, len(pages))
        num_cached = len(tree_pages)
        new_pages = list(pages[num_cached:])
        if any(p in self._pages for p in new_pages) or any(
            p != q and p in self._pages for p, q in zip(pages, tree_pages)
        ):
            raise ValueError("insert: a page passed in is owned by the cache at another position")
        if not new_pages:
            return node, num_cached
        if version != self._version:
            self._free_pages(new_pages)
            return node, num_cached
        leaf = TreeNode(tuple(token_ids[num_cached * ps : len(pages) * ps]), new_pages, node, version)
        leaf.last_access = self._clock
        node.children[leaf.key[:ps]] = leaf
        self._pages.update(new_pages)
        self._num_evictable += len(new_pages)
        self._num_nodes += 1
        self._push(leaf)
        return leaf, num_cached

    def lock(self, node: TreeNode) -> None:
        """Pins node and its ancestors against eviction until the matching unlock."""
        if node.evicted:
            raise ValueError(f"lock: {node} was evicted")
        node.num_locks += 1
        n: TreeNode | None = node
        while n is not None:
            if n.lock_ref == 0:
                self._num_evictable -= len(n.pages)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: TreeNode) -> None:
        """Undoes one lock(node); raises ValueError if node itself holds no lock."""
        if node.num_locks == 0:
            raise ValueError(f"unlock: {node} has no outstanding lock")
        node.num_locks -= 1
        n: TreeNode | None = node
        while n is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_evictable += len(n.pages)
            n = n.parent
        if node.version != self._version:
            self._free_stale_chain(node)
        elif self._is_evictable_leaf(node):
            self._push(node)

    def evict(self, num_pages: int) -> int:
        """Frees whole unlocked leaves, least recently used first, until >= num_pages pages are freed
        or nothing is evictable. Returns the number of pages freed (may exceed num_pages)."""
        freed: list[int] = []
        while len(freed) < num_pages and self._heap:
            time, _, node = heapq.heappop(self._heap)
            if not self._is_evictable_leaf(node):
                continue
            if time < node.last_access:  # touched since it was pushed: requeue at its real time
                self._push(node)
                continue
            parent = node.parent
            freed += self._remove(node)
            if parent is not None and self._is_evictable_leaf(parent):
                self._push(parent)
        if freed:
            self._free_pages(freed)
        return len(freed)

    def flush(self, version: int | None = None) -> int:
        """Frees every unlocked node of one version (None: all versions); returns pages freed."""
        freed: list[int] = []
        for v, root in list(self._roots.items()):
            if version is not None and v != version:
                continue
            stack = [root]
            while stack:
                node = stack.pop()
                for child in list(node.children.values()):
                    if child.lock_ref == 0:  # so is all of its subtree
                        self._remove_subtree(child, freed)
                    else:
                        stack.append(child)
            self._maybe_drop_root(root)
        self._rebuild_heap()
        if freed:
            self._free_pages(freed)
        return len(freed)

    def set_version(self, version: int) -> None:
        """Makes version current and flushes every other version's tree; their locked nodes are freed
        as each is unlocked."""
        self._version = version
        self._root(version)
        for v in [v for v in self._roots if v != version]:
            self.flush(v)

    def check_integrity(self) -> None:
        """Raises AssertionError naming the first broken invariant (see the module docstring)."""
        ps, seen, leaves = self.page_size, set(), []
        num_nodes = num_evictable = 0
        _check(self._version in self._roots, "no tree for the current version {}", self._version)
        for v, root in self._roots.items():
            _check(root.is_root and root.parent is None and root.version == v, "bad root of v{}: {}", v, root)
            _check(not root.pages and not root.evicted, "bad root of v{}: {}", v, root)
            _check(v == self._version or root.children or root.lock_ref > 0, "empty stale tree v{} kept", v)
        for node in (n for root in self._roots.values() for n in self._subtree(root)):
            refs = sum(c.lock_ref for c in node.children.values())
            _check(node.num_locks >= 0, "{}: num_locks {} < 0", node, node.num_locks)
            _check(
                node.lock_ref == node.num_locks + refs, "{}: != own {} + kids {}", node, node.num_locks, refs
            )
            for first, child in node.children.items():
                _check(child.parent is node and child.key[:ps] == first, "{}: bad link from parent", child)
                _check(child.version == node.version and not child.evicted, "{}: evicted or misplaced", child)
                _check(node.is_root or child.last_access <= node.last_access, "{}: newer than parent", child)
            if node.is_root:
                continue
            num_nodes += 1
            _check(len(node.key) % ps == 0, "{}: key not whole pages of {}", node, ps)
            _check(len(node.pages) == len(node.key) // ps, "{}: wrong number of pages", node)
            _check(node.version == self._version or node.lock_ref > 0, "{}: unlocked in a stale tree", node)
            for p in node.pages:
                _check(p not in seen, "page {} appears twice in the tree", p)
                seen.add(p)
            num_evictable += len(node.pages) if node.lock_ref == 0 else 0
            if self._is_evictable_leaf(node):
                leaves.append(node)
        _check(seen == self._pages, "page set out of sync: tree {} vs {}", seen, self._pages)
        _check(num_nodes == self._num_nodes, "node count {}, tree has {}", self._num_nodes, num_nodes)
        _check(num_evictable == self._num_evictable, "evictable {} != {}", self._num_evictable, num_evictable)
        earliest: dict[int, int] = {}
        for time, _, node in self._heap:
            earliest[id(node)] = min(time, earliest.get(id(node), time))
        for leaf in leaves:  # each needs an entry no later than its last access
            _check(earliest.get(id(leaf), leaf.last_access + 1) <= leaf.last_access, "{}: not in heap", leaf)

    # -- internals --

    def _root(self, version: int) -> TreeNode:
        """The tree of version; a missing stale tree is answered by an empty, unregistered root."""
        root = self._roots.get(version)
        if root is None:
            root = TreeNode((), [], None, version)
            if version == self._version:
                self._roots[version] = root
        return root

    def _walk(self, root: TreeNode, token_ids: Sequence[int], max_pages: int) -> tuple[TreeNode, list[int]]:
        """Follows token_ids[:max_pages*ps] down from root, touching each node passed and splitting the
        last one where the match ends inside it. Returns (deepest matched node, its path's pages)."""
        ps, node, pages = self.page_size, root, []
        while len(pages) < max_pages:
            start = len(pages) * ps
            child = node.children.get(tuple(token_ids[start : start + ps]))
            if child is None:
                break
            n = self._num_matching_pages(child.key, token_ids, start, max_pages - len(pages))
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = self._clock
            pages += child.pages
            node = child
        return node, pages

    def _num_matching_pages(
        self, key: tuple[int, ...], token_ids: Sequence[int], start: int, max_pages: int
    ) -> int:
        ps = self.page_size
        n = min(len(key) // ps, max_pages)
        if tuple(token_ids[start : start + n * ps]) == key[: n * ps]:
            return n
        i = 1  # page 0 matched: it is the child's key in its parent
        while tuple(token_ids[start + i * ps : start + (i + 1) * ps]) == key[i * ps : (i + 1) * ps]:
            i += 1
        return i

    def _split(self, node: TreeNode, num_pages: int) -> TreeNode:
        """Cuts node after num_pages pages; the new upper node is returned, node keeps the tail (so
        handles to node still mean the same path). Lock counts and evictable pages are unchanged."""
        ps, cut, parent = self.page_size, num_pages * self.page_size, node.parent
        assert parent is not None and 0 < num_pages < len(node.pages)
        upper = TreeNode(node.key[:cut], node.pages[:num_pages], parent, node.version)
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        parent.children[upper.key[:ps]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        upper.children[node.key[:ps]] = node
        self._num_nodes += 1
        return upper

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return not node.is_root and not node.evicted and not node.children and node.lock_ref == 0

    def _remove(self, node: TreeNode) -> list[int]:
        """Detaches an unlocked leaf; returns its pages, which the caller must pass to free_pages."""
        assert node.parent is not None and node.lock_ref == 0 and not node.children
        del node.parent.children[node.key[: self.page_size]]
        self._pages.difference_update(node.pages)
        self._num_evictable -= len(node.pages)
        self._num_nodes -= 1
        node.evicted, node.parent = True, None
        return node.pages

    def _remove_subtree(self, top: TreeNode, freed: list[int]) -> None:
        order = list(self._subtree(top))
        for node in reversed(order):  # children before parents
            freed += self._remove(node)

    def _free_stale_chain(self, node: TreeNode) -> None:
        """After an unlock in a stale tree: frees the nodes it left unlocked (a chain up from node)."""
        freed: list[int] = []
        while self._is_evictable_leaf(node):
            parent = node.parent
            assert parent is not None
            freed += self._remove(node)
            node = parent
        if node.is_root:
            self._maybe_drop_root(node)
        if freed:
            self._free_pages(freed)

    def _maybe_drop_root(self, root: TreeNode) -> None:
        v = root.version
        if v != self._version and not root.children and root.lock_ref == 0 and self._roots.get(v) is root:
            del self._roots[v]

    def _push(self, node: TreeNode) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (node.last_access, self._seq, node))
        if len(self._heap) > 2 * self._num_nodes + 64:  # amortized O(1): mostly dead entries by now
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = []
        for root in self._roots.values():
            for node in self._subtree(root):
                if self._is_evictable_leaf(node):
                    self._seq += 1
                    self._heap.append((node.last_access, self._seq, node))
        heapq.heapify(self._heap)

    @staticmethod
    def _subtree(top: TreeNode) -> Iterator[TreeNode]:
        """top and its descendants, parents before children."""
        stack = [top]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
