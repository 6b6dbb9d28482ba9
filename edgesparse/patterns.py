"""Which weights to zero: masks for unstructured, block RxC and N:M patterns.

Every function takes a score matrix [out, in*kh*kw] (usually |w|) and returns a 0/1 mask of the
same shape that zeroes an exact count of elements (or blocks), ties broken by position. Packing
the masked dense tensor into a kernel's format is a separate step (the handoff is "a dense tensor
with zeros").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgesparse.errors import EdgesparseError
from edgesparse.recipe import Pattern


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 everywhere except the k smallest scores (stable: earlier positions go first on ties)."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        mask[order[:k]] = 0
    return mask.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _lowest_k_mask(scores, round(sparsity * scores.numel()))


def block_mask(scores: torch.Tensor, sparsity: float, rows: int, cols: int) -> torch.Tensor:
    """Zero whole RxC blocks, lowest mean score first. Edge blocks (when the shape is not a
    multiple of the block) are scored by their real elements only."""
    out, inp = scores.shape
    pad_r, pad_c = (-out) % rows, (-inp) % cols
    padded = F.pad(scores, (0, pad_c, 0, pad_r))
    count = F.pad(torch.ones_like(scores), (0, pad_c, 0, pad_r))
    R, C = padded.shape[0] // rows, padded.shape[1] // cols

    def per_block(t):
        return t.reshape(R, rows, C, cols).sum(dim=(1, 3))

    block_scores = per_block(padded) / per_block(count)
    keep = _lowest_k_mask(block_scores, round(sparsity * block_scores.numel()))
    full = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return full[:out, :inp].contiguous()


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive input elements of each row."""
    out, inp = scores.shape
    if inp % m:
        raise EdgesparseError(f"N:M {n}:{m} needs the input size to be a multiple of {m} (got {inp})")
    groups = scores.reshape(out, inp // m, m)
    # sort descending and stable so ties keep the earlier element
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups)
    mask.scatter_(-1, order[..., :n], 1.0)
    return mask.reshape(out, inp)


def make_mask(weight: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """A mask shaped like `weight` (any rank; dims after the first are flattened)."""
    scores = weight.detach().abs().reshape(weight.shape[0], -1).float()
    if pattern.kind == "unstructured":
        mask = unstructured_mask(scores, sparsity)
    elif pattern.kind == "block":
        mask = block_mask(scores, sparsity, pattern.rows, pattern.cols)
    elif pattern.kind == "nm":
        mask = nm_mask(scores, pattern.n, pattern.m)
    else:
        raise ValueError(f"no element mask for pattern {pattern}")
    return mask.reshape(weight.shape).to(weight.dtype)


def pattern_fits(pattern: Pattern, matrix_shape: tuple[int, int]) -> str | None:
    """Why a pattern cannot apply to a layer of this [out, in] shape, or None if it can."""
    out, inp = matrix_shape
    if pattern.kind == "nm" and inp % pattern.m:
        return f"input size {inp} is not a multiple of {pattern.m}"
    if pattern.kind == "block" and (pattern.rows > out or pattern.cols > inp):
        return f"block {pattern.rows}x{pattern.cols} is larger than the weight ({out}x{inp})"
    return None


# Block shapes `detect_pattern` recognises, largest first (a 8x1-pruned weight is also 4x1-pruned).
_DETECT_BLOCKS = ((8, 1), (1, 16), (4, 1), (1, 8), (2, 1), (1, 4), (1, 2))
_DETECT_NM = ((1, 4), (2, 4), (2, 8), (4, 8))


def detect_pattern(matrix: torch.Tensor, min_sparsity: float = 0.05) -> str | None:
    """The pattern a pruned [out, in] weight follows, read from its zeros: "block:RxC" when nearly
    every zero (95%: int8 rounding adds a few lone zeros) sits in an all-zero RxC block, "nm:N:M" when every M inputs hold at most N non-zeros,
    else "unstructured"; None when it is (nearly) dense."""
    zero = matrix.reshape(matrix.shape[0], -1) == 0
    out, inp = zero.shape
    sparsity = float(zero.float().mean()) if zero.numel() else 0.0
    if sparsity < min_sparsity:
        return None
    for rows, cols in _DETECT_BLOCKS:
        if out % rows or inp % cols or (rows > 1 and out == rows) or (cols > 1 and inp == cols):
            continue
        blocks = zero.reshape(out // rows, rows, inp // cols, cols)
        if int(blocks.all(dim=(1, 3)).sum()) * rows * cols >= 0.95 * int(zero.sum()):
            return f"block:{rows}x{cols}"
    for n, m in _DETECT_NM:
        # N:M pruning leaves exactly 1 - N/M zeros; the check keeps sparse random weights out
        if inp % m == 0 and abs(sparsity - (1 - n / m)) < 0.02 and bool(((~zero).reshape(out, inp // m, m).sum(-1) <= n).all()):
            return f"nm:{n}:{m}"
    return "unstructured"
