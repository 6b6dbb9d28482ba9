import pytest
import torch

from edgesparse.errors import EdgesparseError
from edgesparse.patterns import block_mask, make_mask, nm_mask, unstructured_mask
from edgesparse.recipe import Pattern


@pytest.mark.parametrize("shape", [(64, 32), (7, 13), (1, 5), (128, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.95])
def test_unstructured_exact_count(shape, sparsity):
    w = torch.randn(shape)
    mask = unstructured_mask(w.abs(), sparsity)
    assert int((mask == 0).sum()) == round(sparsity * w.numel())
    # every pruned weight is no larger than every kept one
    if 0 < int((mask == 0).sum()) < w.numel():
        assert w.abs()[mask == 0].max() <= w.abs()[mask == 1].min()


def test_unstructured_ties_are_exact():
    mask = unstructured_mask(torch.ones(10, 10), 0.37)
    assert int((mask == 0).sum()) == 37


@pytest.mark.parametrize("rows,cols", [(4, 1), (1, 4), (8, 1), (1, 16), (2, 2)])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_block_structure_elementwise(rows, cols, sparsity):
    out, inp = 64, 48
    w = torch.randn(out, inp)
    mask = block_mask(w.abs(), sparsity, rows, cols)
    blocks = mask.reshape(out // rows, rows, inp // cols, cols).permute(0, 2, 1, 3).reshape(-1, rows * cols)
    # each block is all-kept or all-pruned
    assert bool(((blocks.sum(1) == 0) | (blocks.sum(1) == rows * cols)).all())
    n_blocks = blocks.shape[0]
    assert int((blocks.sum(1) == 0).sum()) == round(sparsity * n_blocks)
    assert float((mask == 0).float().mean()) == pytest.approx(round(sparsity * n_blocks) / n_blocks)
    # pruned blocks have the lowest mean magnitude
    scores = w.abs().reshape(out // rows, rows, inp // cols, cols).mean(dim=(1, 3)).reshape(-1)
    pruned = blocks.sum(1) == 0
    assert scores[pruned].max() <= scores[~pruned].min()


def test_block_with_ragged_edges_keeps_partial_blocks_whole():
    w = torch.randn(10, 7)  # not multiples of 4x1
    mask = block_mask(w.abs(), 0.5, 4, 1)
    for r0 in range(0, 10, 4):
        for c in range(7):
            col = mask[r0 : r0 + 4, c]
            assert bool((col == col[0]).all())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (3, 4), (1, 2)])
def test_nm_structure_elementwise(n, m):
    w = torch.randn(32, 8 * m)
    mask = nm_mask(w.abs(), n, m)
    groups = mask.reshape(32, -1, m)
    assert bool((groups.sum(-1) == n).all())
    kept = (w.abs().reshape(32, -1, m) * groups)
    dropped_max = (w.abs().reshape(32, -1, m) * (1 - groups)).amax(-1)
    kept_min = torch.where(groups.bool(), kept, torch.full_like(kept, float("inf"))).amin(-1)
    assert bool((dropped_max <= kept_min).all())


def test_nm_needs_divisible_input():
    with pytest.raises(EdgesparseError, match="multiple of 4"):
        nm_mask(torch.randn(4, 6), 2, 4)


def test_make_mask_keeps_conv_shape():
    w = torch.randn(16, 8, 3, 3)
    mask = make_mask(w, Pattern.parse("nm:2:4"), 0.5)
    assert mask.shape == w.shape
    assert bool((mask.reshape(16, -1, 4).sum(-1) == 2).all())
