"""Masks hit the requested sparsity and pattern exactly; N:M ranks round-trip; bad patterns fail clearly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress import HfCompressConfig
from hfcompress.sparsity.masks import lowest_k_mask, nm_mask, prune_count, split_count, unstructured_mask
from hfcompress.sparsity.nm_index import nm_index_bits, pack_nm_index, pattern_ranks, patterns_from_ranks, unpack_nm_index
from hfcompress.spec import LayerSpec

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70))
patterns = st.sampled_from([(2, 4), (4, 8), (1, 2), (1, 4), (3, 5), (7, 8), (8, 16), (11, 24)])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0, 0.99), per_row=st.booleans(), seed=st.integers(0, 999))
def test_unstructured_mask_prunes_exact_count_of_lowest(shape, sparsity, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g).round(decimals=1)  # plenty of ties
    keep = unstructured_mask(scores, sparsity, per_row=per_row)
    k = prune_count(scores.numel(), sparsity)
    assert int((~keep).sum()) == k
    if per_row:
        pruned = (~keep).sum(1)
        assert int(pruned.max() - pruned.min()) <= 1
        for r in range(shape[0]):  # within a row, nothing kept scores below anything pruned
            if (~keep[r]).any() and keep[r].any():
                assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()
    elif 0 < k < scores.numel():
        assert scores[keep].min() >= scores[~keep].max()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, nm=patterns, seed=st.integers(0, 999))
def test_nm_mask_pattern_is_exact_and_ranks_round_trip(shape, nm, seed):
    n, m = nm
    rows, cols = shape
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m)
    full, tail = divmod(cols, m)
    groups = keep[:, : full * m].reshape(rows, full, m).sum(-1)
    assert bool((groups == n).all())
    if tail:
        assert bool((keep[:, full * m :].sum(-1) == min(n, tail)).all())
    ranks = pattern_ranks(keep, n, m)
    assert int(ranks.max()) < math.comb(m, n)
    packed = pack_nm_index(ranks, n, m)
    assert packed.shape[1] == math.ceil(-(-cols // m) * nm_index_bits(n, m) / 8)
    assert torch.equal(unpack_nm_index(packed, n, m, cols), ranks)
    assert torch.equal(patterns_from_ranks(ranks, n, m, cols), keep)


def test_nm_keeps_the_largest_in_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_ranks_are_colex_and_two_four_needs_three_bits():
    assert nm_index_bits(2, 4) == 3 and nm_index_bits(4, 8) == 7 and nm_index_bits(8, 16) == 14
    lut = patterns_from_ranks(torch.arange(6).reshape(1, 6), 2, 4, 24).reshape(6, 4)
    assert lut.int().tolist()[:3] == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]]


def test_lowest_k_and_split_count():
    assert lowest_k_mask(torch.tensor([3.0, 1.0, 2.0]), 2).tolist() == [True, False, False]
    parts = split_count(10, [3, 3, 4])
    assert parts.sum() == 10 and parts.tolist() == [3, 3, 4]
    parts = split_count(5, [4, 4, 4])
    assert parts.sum() == 5 and max(parts) - min(parts) <= 1
    with pytest.raises(ValueError, match="total=13"):
        split_count(13, [4, 4, 4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity_structure="4:2"), "N < M"),
        (dict(sparsity_structure="4:4"), "N < M"),
        (dict(sparsity_structure="0:4"), "N >= 1"),
        (dict(sparsity_structure="2-4"), "not understood"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.1), r"\[0, 1\)"),
        (dict(sparsity=0.3, sparsity_structure="2:4"), "contradicts"),
    ],
)
def test_bad_patterns_and_sparsities_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSpec(**kwargs)
    with pytest.raises(ValueError, match=message):
        HfCompressConfig(method="magnitude", **kwargs)


def test_mask_functions_validate_their_inputs():
    with pytest.raises(ValueError, match=r"sparsity=1.5 must be a number in \[0, 1\)"):
        unstructured_mask(torch.randn(2, 2), 1.5)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_mask(torch.randn(2, 8), 5, 4)
    with pytest.raises(ValueError, match="keeps 3 of them"):
        pattern_ranks(torch.tensor([[True, True, True, False]]), 2, 4)


def test_sparsity_needs_a_pruning_method():
    with pytest.raises(ValueError, match="does not prune"):
        HfCompressConfig(method="rtn", sparsity=0.5)
