from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gyre.engine.radix_cache import RadixCache, TreeNode


class Freed(list):
    """free_pages callback that remembers every page handed back, in order."""

    def __call__(self, pages: list[int]) -> None:
        assert pages, "free_pages called with nothing"
        self.extend(pages)


def make(page_size: int = 1) -> tuple[RadixCache, Freed]:
    freed = Freed()
    return RadixCache(page_size, freed), freed


# -- unit tests --


def test_match_whole_pages_only() -> None:
    cache, _ = make(page_size=2)
    node, n = cache.insert([1, 2, 3, 4, 5], [10, 11])  # the fifth token is past the last page: ignored
    assert n == 0 and node.key == (1, 2, 3, 4)
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == [10, 11]
    m = cache.match_prefix([1, 2, 3])  # (3,) is not a whole page
    assert m.pages == [10] and m.num_tokens == 2
    assert cache.match_prefix([1, 9, 3, 4]).pages == []  # page granularity: [1, 9] != [1, 2]
    assert cache.match_prefix([]).node.is_root
    cache.check_integrity()


def test_split_at_page_boundary_keeps_handles() -> None:
    cache, freed = make(page_size=2)
    first, _ = cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    cache.lock(first)
    node, n = cache.insert([1, 2, 3, 4, 7, 8], [20, 21, 22])
    assert n == 2 and node.pages == [22]  # tree kept 10, 11; the caller still owns 20, 21
    m = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert m.pages == [10, 11] and m.node.key == (1, 2, 3, 4) and set(m.node.children) == {(5, 6), (7, 8)}
    assert first.key == (5, 6) and first.parent is m.node  # the handle still ends at the same token
    cache.check_integrity()
    cache.unlock(first)  # undoes the lock on the split-off ancestors too
    assert cache.num_evictable_pages == 4
    assert cache.flush() == 4 and sorted(freed) == [10, 11, 12, 22]
    cache.check_integrity()


def test_match_splits_mid_node() -> None:
    cache, _ = make(page_size=1)
    leaf, _ = cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    m = cache.match_prefix([1, 2, 9])
    assert m.pages == [10, 11] and m.node.key == (1, 2) and leaf.key == (3, 4)
    cache.lock(m.node)
    assert cache.evict(10) == 2  # only the unlocked tail (3, 4)
    assert cache.cached_pages() == {10, 11}
    cache.check_integrity()


def test_insert_duplicate_prefix() -> None:
    cache, freed = make(page_size=1)
    cache.insert([1, 2, 3], [10, 11, 12])
    node, n = cache.insert([1, 2, 3], [20, 21, 22])
    assert n == 3 and node.pages == [10, 11, 12] and cache.cached_pages() == {10, 11, 12} and not freed
    # A request that matched [1, 2] (pages 10, 11) and computed 3, 4 itself:
    node, n = cache.insert([1, 2, 3, 4], [10, 11, 30, 31])
    assert n == 3 and node.pages == [31]  # the caller frees its duplicate 30; 10, 11 were the tree's
    assert cache.cached_pages() == {10, 11, 12, 31}
    cache.check_integrity()


def test_insert_rejects_pages_owned_elsewhere() -> None:
    cache, _ = make(page_size=1)
    cache.insert([1, 2], [10, 11])
    with pytest.raises(ValueError):
        cache.insert([5, 6], [20, 10])  # 10 already holds (1,)
    with pytest.raises(ValueError):
        cache.insert([5, 6], [20, 20])
    with pytest.raises(ValueError):
        cache.insert([5, 6], [20, 21, 22])  # 3 pages need 3 tokens
    cache.check_integrity()


def test_evict_lru_leaves_first() -> None:
    cache, freed = make(page_size=1)
    cache.insert([1, 2], [10, 11])
    cache.insert([1, 3], [10, 12])  # 10: the tree's own page for (1,)
    cache.insert([4], [13])
    cache.match_prefix([1, 2])  # (1, 2) is now the most recent
    assert cache.evict(1) == 1 and freed == [12]
    assert cache.evict(1) == 1 and freed == [12, 13]
    # (1,) becomes a leaf only once (1, 2) is gone: the leaf goes first, then its parent.
    assert cache.evict(2) == 2 and freed == [12, 13, 11, 10]
    assert cache.evict(1) == 0 and cache.num_cached_pages == 0
    cache.check_integrity()


def test_evict_whole_nodes_and_locks() -> None:
    cache, freed = make(page_size=1)
    a, _ = cache.insert([1, 2, 3], [10, 11, 12])
    b, _ = cache.insert([5, 6], [20, 21])
    cache.lock(a)
    assert cache.num_evictable_pages == 2
    assert cache.evict(1) == 2 and sorted(freed) == [20, 21]  # a node goes whole
    assert b.evicted
    with pytest.raises(ValueError):
        cache.lock(b)
    assert cache.evict(5) == 0 and cache.flush() == 0
    cache.unlock(a)
    assert cache.num_evictable_pages == 3 and cache.evict(5) == 3
    cache.check_integrity()


def test_unlock_errors() -> None:
    cache, _ = make(page_size=1)
    leaf, _ = cache.insert([1, 2], [10, 11])
    mid = cache.match_prefix([1]).node
    with pytest.raises(ValueError):
        cache.unlock(leaf)
    cache.lock(leaf)
    with pytest.raises(ValueError):  # mid's lock_ref is 1, but through leaf's lock, not its own
        cache.unlock(mid)
    cache.unlock(leaf)
    cache.check_integrity()


def test_versions_are_separate() -> None:
    cache, _ = make(page_size=1)
    cache.insert([1, 2], [10, 11], version=0)
    cache.insert([1, 2], [20, 21], version=0)
    assert cache.match_prefix([1, 2], version=1).pages == []
    cache.set_version(1)
    node, n = cache.insert([1, 2], [30, 31])
    assert n == 0 and cache.match_prefix([1, 2]).pages == [30, 31]
    assert cache.match_prefix([1, 2], version=0).pages == []
    cache.check_integrity()


def test_set_version_frees_locked_nodes_on_unlock() -> None:
    cache, freed = make(page_size=1)
    a, _ = cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 4], [10, 13])
    cache.insert([7], [14])
    cache.lock(a)
    cache.set_version(1)
    assert sorted(freed) == [13, 14] and cache.cached_pages() == {10, 11, 12}
    assert cache.num_evictable_pages == 0 and cache.evict(10) == 0
    assert cache.match_prefix([1, 2, 3], version=0).pages == [10, 11, 12]  # the old tree still answers
    # Finishing a request started under version 0: nothing new is cached, its new pages are freed now.
    node, n = cache.insert([1, 2, 3, 5], [10, 11, 12, 40], version=0)
    assert n == 3 and node is a and freed[-1] == 40
    cache.check_integrity()
    cache.unlock(a)
    assert sorted(freed) == [10, 11, 12, 13, 14, 40] and cache.num_cached_pages == 0
    cache.check_integrity()  # also checks that the empty version-0 tree was dropped


def test_flush_one_version() -> None:
    cache, freed = make(page_size=1)
    a, _ = cache.insert([1], [10])
    cache.lock(a)
    cache.set_version(1)
    cache.insert([2], [20])
    assert cache.flush(version=0) == 0 and cache.flush(version=1) == 1 and freed == [20]
    cache.unlock(a)
    assert freed == [20, 10]
    cache.check_integrity()


def test_evict_scales() -> None:
    cache, freed = make(page_size=1)
    n = 20_000
    for i in range(n):
        cache.insert([i, 0], [2 * i, 2 * i + 1])
    recent = list(range(n - 1, 0, -97))
    for i in recent:  # touched after all the others, in this order
        cache.match_prefix([i, 0])
    for _ in range(2 * n):
        cache.evict(1)
    touched = set(recent)
    untouched = [p for i in range(n) if i not in touched for p in (2 * i, 2 * i + 1)]
    assert freed == untouched + [p for i in recent for p in (2 * i, 2 * i + 1)]
    cache.check_integrity()


def test_does_not_import_torch() -> None:
    # Load the file alone: gyre/__init__.py itself pulls in the engine (and torch).
    path = Path(__file__).parents[2] / "gyre" / "engine" / "radix_cache.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('radix_cache', {str(path)!r})\n"
        "mod = sys.modules['radix_cache'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules, 'radix_cache imports torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- stateful test against a naive model --

TOKENS = st.lists(st.integers(0, 3), min_size=2, max_size=8)
SUFFIX = st.lists(st.integers(0, 3), min_size=1, max_size=4)
VERSION = st.sampled_from([None] * 6 + [0, 1])  # None: the current version


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives RadixCache like a scheduler would and checks it against a page-level model.

    Model: entries[(version, prefix)] = [page, last touch] for every cached page-aligned prefix, and
    handles: the (node, version, prefix) locks the "caller" holds. A prefix is locked iff it is a
    prefix of a held handle's. Pages are accounted in four disjoint sets: in the tree, freed through
    the callback, held by the caller (computed, not yet inserted) and freed by the caller.
    """

    @initialize(page_size=st.sampled_from([1, 2]), warm=st.lists(TOKENS, max_size=6))
    def setup(self, page_size: int, warm: list[list[int]]) -> None:
        self.ps = page_size
        self.freed = Freed()
        self.cache = RadixCache(page_size, self.freed)
        self.version = 0
        self.clock = 0
        self.entries: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        self.handles: list[tuple[TreeNode, int, tuple[int, ...]]] = []
        self.requests: list[dict] = []
        self.seqs: list[tuple[int, ...]] = []  # every sequence seen, to draw shared prefixes from
        self.num_allocated = 0
        self.caller_held: set[int] = set()
        self.caller_freed: set[int] = set()
        for tokens in warm:  # start most runs from a populated cache
            self.seqs.append(tuple(tokens))
            self._insert(tokens, self._alloc(len(tokens) // self.ps), self.version)

    # -- model helpers --

    def _v(self, version: int | None) -> int:
        return self.version if version is None else version

    def _draw_tokens(self, data: st.DataObject) -> list[int]:
        """Fresh tokens, or a cached prefix or a sequence seen before, cut short and extended."""
        source = data.draw(st.sampled_from(["fresh", "cached", "seen"]))
        bases = [p for _, p in self.entries] if source == "cached" else self.seqs if source == "seen" else []
        if bases:
            base = data.draw(st.sampled_from(bases))
            tokens = list(base[: len(base) - data.draw(st.integers(0, len(base)))]) + data.draw(SUFFIX)
        else:
            tokens = data.draw(TOKENS)
        self.seqs.append(tuple(tokens))
        return tokens

    def _alloc(self, n: int) -> list[int]:
        pages = list(range(self.num_allocated, self.num_allocated + n))
        self.num_allocated += n
        self.caller_held.update(pages)
        return pages

    def _cached_run(self, v: int, tokens: list[int], max_pages: int) -> list[int]:
        """Pages of the longest cached page-aligned prefix of tokens[:max_pages*ps] in the model."""
        pages = []
        while len(pages) < max_pages and (v, tuple(tokens[: (len(pages) + 1) * self.ps])) in self.entries:
            pages.append(self.entries[v, tuple(tokens[: (len(pages) + 1) * self.ps])][0])
        return pages

    def _touch(self, v: int, tokens: list[int], num_pages: int) -> None:
        for i in range(1, num_pages + 1):
            self.entries[v, tuple(tokens[: i * self.ps])][1] = self.clock

    def _locked(self, v: int, prefix: tuple[int, ...]) -> bool:
        return any(hv == v and hp[: len(prefix)] == prefix for _, hv, hp in self.handles)

    @staticmethod
    def _is_leaf(entries: dict, v: int, prefix: tuple[int, ...]) -> bool:
        return not any(
            ev == v and len(ep) > len(prefix) and ep[: len(prefix)] == prefix for ev, ep in entries
        )

    def _expect_freed(self, before: int, pages: set[int]) -> None:
        got = self.freed[before:]
        assert len(got) == len(set(got)) and set(got) == pages, (sorted(got), sorted(pages))

    def _drop_stale_unlocked(self) -> set[int]:
        gone = {k for k in self.entries if k[0] != self.version and not self._locked(*k)}
        return {self.entries.pop(k)[0] for k in gone}

    def _match(self, tokens: list[int], version: int | None) -> tuple[TreeNode, int, tuple[int, ...]]:
        v = self._v(version)
        expected = self._cached_run(v, tokens, len(tokens) // self.ps)
        self.clock += 1
        m = self.cache.match_prefix(tokens, version)
        assert m.pages == expected and m.num_tokens == len(expected) * self.ps
        self._touch(v, tokens, len(expected))
        return m.node, v, tuple(tokens[: m.num_tokens])

    def _insert(self, tokens: list[int], pages: list[int], v: int) -> tuple[TreeNode, int]:
        """Inserts as the caller; returns the node and the number of pages already cached."""
        expected = self._cached_run(v, tokens, len(pages))
        self.clock += 1
        before = len(self.freed)
        node, n = self.cache.insert(tokens, pages, v)
        assert n == len(expected)
        new = pages[n:]
        if v == self.version:
            self._expect_freed(before, set())
            for i, page in enumerate(new, start=n + 1):
                self.entries[v, tuple(tokens[: i * self.ps])] = [page, 0]
            self._touch(v, tokens, len(pages))
        else:  # stale version: nothing new cached, new pages freed at once
            self._expect_freed(before, set(new))
            self._touch(v, tokens, n)
        self.caller_held.difference_update(new)
        for mine, tree in zip(pages[:n], expected):  # duplicates stay the caller's: it frees them now
            if mine != tree:
                self.caller_held.remove(mine)
                self.caller_freed.add(mine)
        return node, n

    def _unlock(self, node: TreeNode, v: int, prefix: tuple[int, ...]) -> None:
        self.handles.remove((node, v, prefix))
        before = len(self.freed)
        self.cache.unlock(node)
        self._expect_freed(before, self._drop_stale_unlocked())

    # -- rules --

    @rule(data=st.data(), version=VERSION, lock=st.booleans())
    def match(self, data: st.DataObject, version: int | None, lock: bool) -> None:
        tokens = self._draw_tokens(data)
        node, v, prefix = self._match(tokens, version)
        if lock:
            self.cache.lock(node)
            self.handles.append((node, v, prefix))

    @rule(data=st.data(), version=VERSION)
    def insert_fresh(self, data: st.DataObject, version: int | None) -> None:
        tokens = self._draw_tokens(data)
        self._insert(tokens, self._alloc(len(tokens) // self.ps), self._v(version))

    @rule(data=st.data(), version=VERSION)
    def start_request(self, data: st.DataObject, version: int | None) -> None:
        """Admission: match and lock the cached prefix, allocate pages for the rest (to be computed)."""
        tokens = self._draw_tokens(data)
        node, v, prefix = self._match(tokens, version)
        self.cache.lock(node)
        self.handles.append((node, v, prefix))
        matched = self._cached_run(v, tokens, len(prefix) // self.ps)
        pages = matched + self._alloc(len(tokens) // self.ps - len(matched))
        self.requests.append({"tokens": tokens, "v": v, "handle": (node, v, prefix), "pages": pages})

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), keep=st.booleans())
    def finish_request(self, data: st.DataObject, keep: bool) -> None:
        """Insert what was computed, free the duplicates, keep (session) or drop the lock."""
        req = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        node, n = self._insert(req["tokens"], req["pages"], req["v"])
        assert n >= len(req["handle"][2]) // self.ps  # the locked prefix cannot have gone
        if keep:
            covered = len(req["pages"]) if req["v"] == self.version else n
            self.cache.lock(node)
            self.handles.append((node, req["v"], tuple(req["tokens"][: covered * self.ps])))
        self._unlock(*req["handle"])

    @precondition(lambda self: any(h not in [r["handle"] for r in self.requests] for h in self.handles))
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        free = [h for h in self.handles if h not in [r["handle"] for r in self.requests]]
        self._unlock(*data.draw(st.sampled_from(free)))

    @precondition(lambda self: any(not self._locked(*k) for k in self.entries))
    @rule(num_pages=st.integers(1, 4))
    def evict(self, num_pages: int) -> None:
        # The model's LRU order: repeatedly the least recently touched unlocked leaf page.
        order, entries = [], dict(self.entries)
        while leaves := [k for k in entries if not self._locked(*k) and self._is_leaf(entries, *k)]:
            k = min(leaves, key=lambda k: entries[k][1])
            order.append((k, *entries.pop(k)))
        before = len(self.freed)
        num_freed = self.cache.evict(num_pages)
        assert num_freed == len(self.freed) - before >= min(num_pages, len(order))
        # Whole nodes go, so a few pages past num_pages may too: only the rest of the last node.
        self._expect_freed(before, {page for _, page, _ in order[:num_freed]})
        if num_freed > num_pages:
            assert num_pages > 0 and len({t for _, _, t in order[num_pages - 1 : num_freed]}) == 1
        for k, _, _ in order[:num_freed]:
            del self.entries[k]

    @precondition(lambda self: len(self.entries) >= 4)  # else most runs would hold an empty cache
    @rule(version=st.sampled_from([None, 0, 1]))
    def flush(self, version: int | None) -> None:
        gone = {k for k in self.entries if (version is None or k[0] == version) and not self._locked(*k)}
        before = len(self.freed)
        assert self.cache.flush(version) == len(gone)
        self._expect_freed(before, {self.entries.pop(k)[0] for k in gone})

    @rule(version=st.sampled_from([0, 1]))
    def set_version(self, version: int) -> None:
        before = len(self.freed)
        self.version = version
        self.cache.set_version(version)
        self._expect_freed(before, self._drop_stale_unlocked())

    # -- invariants --

    @invariant()
    def integrity(self) -> None:
        self.cache.check_integrity()

    @invariant()
    def tree_equals_model(self) -> None:
        tree = {}
        for v, root in self.cache._roots.items():
            stack = [(root, ())]
            while stack:
                node, path = stack.pop()
                for i, page in enumerate(node.pages):
                    tree[v, path + node.key[: (i + 1) * self.ps]] = page
                stack += [(c, path + node.key) for c in node.children.values()]
        assert tree == {k: page for k, (page, _) in self.entries.items()}
        unlocked = sum(1 for k in self.entries if not self._locked(*k))
        assert self.cache.num_cached_pages == len(self.entries) and self.cache.num_evictable_pages == unlocked

    @invariant()
    def locked_prefixes_cached(self) -> None:
        for _, v, prefix in self.handles:
            for i in range(1, len(prefix) // self.ps + 1):
                assert (v, prefix[: i * self.ps]) in self.entries

    @invariant()
    def page_accounting(self) -> None:
        freed, cached = set(self.freed), self.cache.cached_pages()
        assert len(freed) == len(self.freed), "a page was freed twice"
        parts = [freed, cached, self.caller_held, self.caller_freed]
        assert sum(map(len, parts)) == self.num_allocated
        assert set().union(*parts) == set(range(self.num_allocated))


RadixCacheMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_radix_cache_stateful = RadixCacheMachine.TestCase
