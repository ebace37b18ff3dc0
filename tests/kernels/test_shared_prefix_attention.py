"""Shared-prefix decode: rows sharing leading KV pages (n samples of a prompt) read them once per group.

The kernel is checked against the torch reference and the plain decode; the host grouping against a
brute-force reference of the same rule.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyre.kernels.attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    shared_prefix_groups,
    shared_prefix_max_rows,
)


def _grouped_table(groups, page_size: int, seed: int):
    """groups: [(shared_pages, seq_lens)]. A group's rows use the same first shared_pages page ids (as many
    as they have pages), then distinct pages of their own. Page ids are shuffled, so page 0 is a real page
    somewhere; rows are padded with 0. -> (page_table [B, W] int32, num_pages, seq_lens)."""
    seq_lens = [s for _, lens in groups for s in lens]
    row_pages = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(p for p, _ in groups) + sum(row_pages)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(row_pages, default=0) + 1, dtype=torch.int32)
    used, b = 0, 0
    for shared_pages, lens in groups:
        common = perm[used : used + shared_pages]
        used += shared_pages
        for s in lens:
            n = -(-s // page_size)
            k = min(n, shared_pages)
            table[b, :k] = common[:k]
            table[b, k:n] = perm[used : used + n - k]
            used, b = used + n - k, b + 1
    return table, num_pages, seq_lens


def _decode_all(case, table, num_pages, seq_lens, page_size, heads, head_dim, split_size, grouped, seed):
    """The shared-prefix decode (first, so that no same-sized buffer of the plain call is reused), the
    plain decode and the torch reference, on random K/V and queries."""
    num_q_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    shape = (num_pages * page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(case.device, case.dtype)
    v_cache = torch.randn(shape, generator=gen).to(case.device, case.dtype)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(case.device, case.dtype)
    page_table = table.to(case.device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=case.device)
    prefix_lens, group_lens = (t.to(case.device) for t in grouped)
    args = (q, k_cache, v_cache, page_table, lens, page_size, head_dim**-0.5)
    shared = torch.full_like(q, float("nan"))  # poison: every element must be written
    paged_decode_attention(
        *args, split_size=split_size, out=shared, prefix_lens=prefix_lens, group_lens=group_lens
    )
    plain = paged_decode_attention(*args, split_size=split_size)
    return shared, plain, paged_decode_attention_ref(*args)


SHARED_CASES = [
    # page_size, head_dim, (Hq, Hkv), split_size, groups: (shared pages, prefix tokens, row seq lens)
    (16, 64, (8, 2), 16, [
        (3, 48, [48, 49, 70]),  # a row exactly the prefix long: all its splits are the leader's
        (0, 0, [20]),  # plain rows between groups
        (2, 32, [33]),  # a group of one row
        (1, 0, [16, 40]),  # sharing pages but decoded plain
        (0, 0, [0]),  # a padded row
    ]),
    (3, 40, (8, 1), 16, [
        (11, 32, [32, 50, 33, 47, 40, 32, 35, 45]),  # max_rows (8); the prefix ends inside a shared page
        (0, 0, [5]),
        (6, 16, [18, 30]),
        (0, 0, [0]),
    ]),
    (16, 64, (2, 2), 32, [
        (0, 0, [7]),
        (4, 64, [64, 65, 100]),  # no GQA: one query head per row in the dot; two prefix splits
        (0, 0, [50]),
        (2, 32, [40, 33]),
    ]),
    (3, 32, (3, 1), 16, [
        (11, 32, [32 + i % 5 for i in range(21)]),  # 3 query heads per kv head: max_rows 21, M = 63
        (0, 0, [0, 0]),
    ]),
    # prefixes ending inside a split: the leader's part of that split is merged as an extra partial
    (16, 64, (8, 2), 32, [
        (3, 48, [48, 49, 70, 96]),  # a row exactly the prefix long: its own part of split 1 is empty
        (0, 0, [20]),
        (5, 80, [81, 100]),  # a prefix ending inside split 2; 100 tokens: a row's last split is partial
        (2, 16, [40]),  # a group of one row, a prefix shorter than a split
    ]),
    (3, 40, (4, 1), 32, [
        (12, 35, [35, 36, 64, 65, 90]),  # not a multiple of the page size either (capped by a row)
        (0, 0, [0]),
    ]),
]  # fmt: skip


@pytest.mark.parametrize("page_size,head_dim,heads,split_size,groups", SHARED_CASES)
def test_shared_prefix_decode(case, page_size, head_dim, heads, split_size, groups):
    max_rows = shared_prefix_max_rows(heads[0] // heads[1])
    prefix_lens, group_lens = [], []
    for shared_pages, prefix, lens in groups:
        assert prefix <= min(shared_pages * page_size, *lens) and len(lens) <= max_rows
        prefix_lens += [prefix] * len(lens)
        group_lens += [len(lens) if prefix > 0 else 0] + [0] * (len(lens) - 1)
    table, num_pages, seq_lens = _grouped_table([(p, lens) for p, _, lens in groups], page_size, seed=1)
    grouped = (torch.tensor(prefix_lens, dtype=torch.int32), torch.tensor(group_lens, dtype=torch.int32))
    shared, plain, ref = _decode_all(case, table, num_pages, seq_lens, page_size, heads, head_dim,
                                     split_size, grouped, seed=2)  # fmt: skip
    case.close(shared, ref)
    case.close(shared, plain)


@pytest.mark.parametrize("page_size", [3, 16])
def test_shared_prefix_groups_drive_the_decode(case, page_size):
    """End to end on a GRPO-like batch: the groups found from the page table, then the decode."""
    gen = torch.Generator().manual_seed(page_size)
    groups = []
    for _ in range(3):  # prompts of 16..50 tokens, 4 samples each; the radix cache shares full pages
        prompt = int(torch.randint(16, 51, (), generator=gen))
        tails = torch.randint(1, 21, (4,), generator=gen).tolist()
        groups.append((prompt // page_size, [prompt + t for t in tails]))
    groups.append((0, [0]))  # a padded row
    table, num_pages, seq_lens = _grouped_table(groups, page_size, seed=3)
    heads, split_size = (4, 1), 16
    grouped = shared_prefix_groups(table, seq_lens, page_size, shared_prefix_max_rows(4))  # any prefix length
    assert grouped is not None and grouped[1].tolist().count(4) == 3
    shared, plain, ref = _decode_all(case, table, num_pages, seq_lens, page_size, heads, 64, split_size,
                                     grouped, seed=4)  # fmt: skip
    case.close(shared, ref)
    case.close(shared, plain)


def test_shared_prefix_decode_arguments():
    q = torch.zeros(2, 4, 16)
    cache = torch.zeros(32, 2, 16)
    table, lens = torch.zeros(2, 2, dtype=torch.int32), torch.full((2,), 16, dtype=torch.int32)
    prefix, group = torch.tensor([16, 16], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    args = (q, cache, cache, table, lens, 16, 0.25)
    with pytest.raises(AssertionError, match="fixed split size"):
        paged_decode_attention(*args, num_splits=2, prefix_lens=prefix, group_lens=group)
    with pytest.raises(AssertionError, match="together"):
        paged_decode_attention(*args, prefix_lens=prefix)
    with pytest.raises(AssertionError):
        paged_decode_attention(*args, prefix_lens=prefix.long(), group_lens=group)


# --------------------------------------------------------------------------------------------------
# shared_prefix_groups


def _shared_tokens(table, seq_lens, page_size, a: int, b: int) -> int:
    """Tokens rows a and b share: their common leading page ids over pages both use, capped by both lens."""
    pages = 0
    while pages < min(-(-seq_lens[a] // page_size), -(-seq_lens[b] // page_size)):
        if int(table[a, pages]) != int(table[b, pages]):
            break
        pages += 1
    return min(pages * page_size, seq_lens[a], seq_lens[b])


def _groups_reference(table, seq_lens, page_size, max_rows, split_size):
    """The documented rule, row by row: the share of a row with the next is its group's prefix, kept while
    the following rows share all of it (up to max_rows rows); a row that shares less with the next row
    than that row with its own next one stays plain."""
    batch = len(seq_lens)
    shared = [_shared_tokens(table, seq_lens, page_size, b, b + 1) // split_size * split_size
              for b in range(batch - 1)] + [0, 0]  # fmt: skip
    prefix_lens, group_lens = [0] * batch, [0] * batch
    leader = 0
    while leader < batch:
        prefix, rows = shared[leader], 1
        if prefix > 0 and prefix >= shared[leader + 1]:
            while rows < max_rows and shared[leader + rows - 1] >= prefix:
                rows += 1
        if rows > 1:
            prefix_lens[leader : leader + rows] = [prefix] * rows
            group_lens[leader] = rows
        leader += rows
    return (prefix_lens, group_lens) if any(group_lens) else None


def _check_groups(table, seq_lens, page_size, max_rows, split_size, grouped):
    """What the decode relies on: every grouped row shares the leader's pages over the group's prefix."""
    batch = len(seq_lens)
    if grouped is None:
        return
    prefix_lens, group_lens = grouped
    assert prefix_lens.dtype == group_lens.dtype == torch.int32
    assert prefix_lens.shape == group_lens.shape == (batch,)
    prefix_lens, group_lens = prefix_lens.tolist(), group_lens.tolist()
    covered = [False] * batch
    for leader, rows in enumerate(group_lens):
        if rows == 0:
            continue
        prefix = prefix_lens[leader]
        assert 2 <= rows <= max_rows and leader + rows <= batch
        assert prefix > 0 and prefix % split_size == 0
        for r in range(leader, leader + rows):
            assert not covered[r] and prefix_lens[r] == prefix and prefix <= seq_lens[r]
            assert r == leader or group_lens[r] == 0
            assert _shared_tokens(table, seq_lens, page_size, leader, r) >= prefix
            covered[r] = True
    assert all(covered[r] or prefix_lens[r] == 0 for r in range(batch))


def _grpo(prompts: int, samples: int, prompt_pages: int, page_size: int, seed: int):
    tails = torch.randint(1, 40, (prompts * samples,), generator=torch.Generator().manual_seed(seed))
    lens = [prompt_pages * page_size + int(t) for t in tails]
    groups = [(prompt_pages, lens[p * samples : (p + 1) * samples]) for p in range(prompts)]
    return _grouped_table(groups, page_size, seed)


@pytest.mark.parametrize("max_rows,split_size,leaders,prefix", [
    (8, 16, [0, 8, 16, 24], 80),
    (8, 32, [0, 8, 16, 24], 64),  # rounded down to whole splits
    (3, 16, [0, 3, 6, 8, 11, 14, 16, 19, 22, 24, 27, 30], 80),  # groups of 3, 3 and 2 per prompt
    (64, 16, [0, 8, 16, 24], 80),  # a group never spans two prompts
])  # fmt: skip
def test_shared_prefix_groups_grpo(max_rows, split_size, leaders, prefix):
    """4 prompts x 8 samples; each prompt 5 full pages, then a distinct tail per sample."""
    table, _, seq_lens = _grpo(4, 8, 5, 16, seed=0)
    grouped = shared_prefix_groups(table, seq_lens, 16, max_rows, split_size)
    _check_groups(table, seq_lens, 16, max_rows, split_size, grouped)
    prefix_lens, group_lens = grouped
    assert group_lens.nonzero().flatten().tolist() == leaders
    assert prefix_lens.tolist() == [prefix] * 32


def test_shared_prefix_groups_nothing_shared():
    table, _, seq_lens = _grouped_table([(0, [40, 3, 17, 0, 64])], 16, seed=0)
    assert shared_prefix_groups(table, seq_lens, 16, 8, 16) is None
    table, _, seq_lens = _grpo(2, 4, 3, 16, seed=1)
    assert shared_prefix_groups(table, seq_lens, 16, 8, 64) is None  # 48 shared tokens: no whole split
    assert shared_prefix_groups(table, seq_lens, 16, 1, 16) is None  # one row per group
    assert shared_prefix_groups(table[:1], seq_lens[:1], 16, 8, 16) is None


def test_shared_prefix_groups_padding_is_not_shared():
    """Rows are padded with page 0, which is also a real page: only pages both rows use count."""
    table = torch.tensor([
        [7, 0, 0, 0],  # one page, then padding
        [9, 0, 0, 0],  # padding like the row above: nothing shared
        [0, 0, 0, 0],  # seq_len 0: never grouped, though its padding is the next row's first page
        [0, 5, 0, 0],  # page 0 is this row's first page
        [0, 8, 0, 0],  # shares page 0 with the row above
        [0, 0, 0, 0],  # page 0, then padding: shares page 0, not the padding
    ], dtype=torch.int32)  # fmt: skip
    seq_lens = [16, 16, 0, 32, 20, 16]
    grouped = shared_prefix_groups(table, seq_lens, 16, 8, 16)
    _check_groups(table, seq_lens, 16, 8, 16, grouped)
    assert grouped[0].tolist() == [0, 0, 0, 16, 16, 16] and grouped[1].tolist() == [0, 0, 0, 3, 0, 0]
    assert shared_prefix_groups(table, seq_lens, 16, 8, 32) is None
    seq_lens[2] = 16  # row 2 uses page 0 too now
    assert shared_prefix_groups(table, seq_lens, 16, 8, 16)[1].tolist() == [0, 0, 4, 0, 0, 0]


def test_shared_prefix_groups_keep_the_longer_prefix():
    """Two prompts after a common 1-page system prompt, max_rows 7: the 8th sample of the first prompt
    stays plain rather than leading the second prompt's samples at the system prompt's length."""
    system, tails = 1, [4] * 16
    table, _, seq_lens = _grouped_table([(5, [80 + t for t in tails[:8]]), (5, [80 + t for t in tails[8:]])],
                                        16, seed=5)  # fmt: skip
    table[8:, :system] = table[0, :system]
    grouped = shared_prefix_groups(table, seq_lens, 16, 7, 16)
    _check_groups(table, seq_lens, 16, 7, 16, grouped)
    assert grouped[1].nonzero().flatten().tolist() == [0, 8]
    assert grouped[0].tolist() == [80] * 7 + [0] + [80] * 7 + [0]


@st.composite
def _tables(draw):
    """Prompts of random page lists over a small id pool (accidental matches included); each row takes a
    random head of one prompt's pages, then random pages; random lens within its pages, or 0."""
    page_size = draw(st.sampled_from([1, 3, 16]))
    pool = st.integers(0, 6)
    prompts = draw(st.lists(st.lists(pool, min_size=0, max_size=6), min_size=1, max_size=3))
    rows = []
    for _ in range(draw(st.integers(1, 12))):
        prompt = draw(st.sampled_from(prompts))
        pages = prompt[: draw(st.integers(0, len(prompt)))] + draw(st.lists(pool, max_size=3))
        seq_len = (
            0 if not pages else draw(st.integers((len(pages) - 1) * page_size + 1, len(pages) * page_size))
        )
        rows.append((pages, seq_len if draw(st.integers(0, 9)) else 0))
    table = torch.zeros(len(rows), max(len(p) for p, _ in rows) + 1, dtype=torch.int32)
    for b, (pages, _) in enumerate(rows):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    return table, [s for _, s in rows], page_size


@settings(max_examples=300, deadline=None)
@given(_tables(), st.integers(1, 5), st.sampled_from([1, 2, 16]))
def test_shared_prefix_groups_property(tables, max_rows, split_size):
    table, seq_lens, page_size = tables
    grouped = shared_prefix_groups(table, seq_lens, page_size, max_rows, split_size)
    _check_groups(table, seq_lens, page_size, max_rows, split_size, grouped)
    expected = _groups_reference(table, seq_lens, page_size, max_rows, split_size)
    assert (grouped is None) == (expected is None)
    if grouped is not None:
        assert (grouped[0].tolist(), grouped[1].tolist()) == expected
