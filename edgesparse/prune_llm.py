"""Calibrated one-shot pruning (Wanda, SparseGPT): which weights to zero, chosen with the inputs the
layers see on calibration data, for the unstructured, N:M and block patterns.

- Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 (the input column's norm over the calibration
  tokens), compared within each output row (unstructured), within each row's M-groups (N:M), or
  averaged per block (block RxC). Weights are only zeroed.
- SparseGPT (Frantar & Alistarh 2023): layer-wise OBS reconstruction with H = X^T X from the
  calibration inputs (1% dampening), columns processed left to right in blocks of 128; each
  pruned weight's error is pushed onto the not-yet-processed weights of its row, so the kept
  weights compensate. Masks: per 128-column block for unstructured, per M columns for N:M (both
  chosen adaptively by w^2 / [H^-1]_jj^2 as the columns come up), and for block patterns up front
  from that score averaged per block. Pruned weights stay exactly zero.

Both are sequential: layers are pruned group by group in execution order (a group is one element
of a ModuleList, e.g. a transformer block, or a lone layer), and each group's inputs are recomputed
by a forward pass through the already-pruned groups before it. Which layers are pruned, and to
which pattern, is `prune.plan_layers`' decision, exactly as for magnitude pruning (the `Pruner`).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edgesparse import _progress
from edgesparse.errors import EdgesparseError
from edgesparse.layers import Layer
from edgesparse.patterns import block_mask, nm_mask
from edgesparse.recipe import Pattern

BLOCKSIZE = 128  # SparseGPT's column block (the paper's and reference code's default)
DAMP = 0.01  # dampening: 1% of the mean diagonal of H


class _Stop(Exception):
    """Raised by a hook once a group's last layer has run: the rest of the forward is not needed."""


class _Stats:
    """What one layer's calibration inputs leave behind: the per-column sum of squares (Wanda) or
    the full X^T X (SparseGPT), over all tokens seen."""

    def __init__(self, layer: Layer, full: bool):
        self.layer, self.full = layer, full
        cols = layer.matrix_shape[1]
        self.sq = torch.zeros(cols, dtype=torch.float64)
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64) if full else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = _as_rows(self.layer, x.detach()).double()
        self.sq += (x * x).sum(0)
        if self.full:
            self.xtx += x.T @ x
        self.tokens += x.shape[0]


def _as_rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [tokens, in*kh*kw], the columns of the weight matrix."""
    module = layer.owner
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def group_key(name: str) -> str:
    """Layers in one element of a ModuleList (`model.layers.3.mlp.up_proj` -> `model.layers.3`)
    share a group; any other layer is a group of its own."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match[1] if match else name


def prune_calibrated(model: nn.Module, active: list[tuple[Layer, object]], method: str,
                     calib: Iterable[tuple] | None, batches: int) -> None:
    """Prune `active` [(layer, plan)] in place with `method` ('wanda' | 'sparsegpt') to each plan's
    pattern and target sparsity; `layer.weight` may be a parametrized (masked) weight, in which
    case the mask and the original are both written."""
    data = [b if isinstance(b, tuple) else (b,) for _, b in zip(range(batches), calib or ())]
    if not data:
        raise EdgesparseError(f"--prune-method {method} needs calibration inputs and this model has none",
                              hint="give the bundle a calib() (e.g. text for an LM), or use --prune-method magnitude")
    for layer, _ in active:
        if layer.kind == "conv" and layer.groups != 1 or not isinstance(layer.owner, (nn.Linear, nn.Conv2d)):
            raise EdgesparseError(f"--prune-method {method} works on nn.Linear and ungrouped nn.Conv2d layers; "
                                  f"{layer.name!r} is not one", hint="use --prune-method magnitude")
    order = _execution_order(model, active, data[0])
    groups: dict[str, list] = {}
    for layer, plan in order:
        groups.setdefault(group_key(layer.name), []).append((layer, plan))
    with torch.no_grad(), _progress.bar(f"{method} pruning ({len(data)} calibration batches)", len(groups)) as advance:
        for members in groups.values():
            stats = _collect(model, [layer for layer, _ in members], data, full=method == "sparsegpt")
            for layer, plan in members:
                pattern = Pattern.parse(plan.pattern)
                stat = stats[layer.name]
                if method == "wanda":
                    weight, mask = wanda(_matrix(layer), stat.sq, pattern, plan.target_sparsity)
                else:
                    weight, mask = sparsegpt(_matrix(layer), stat.xtx / max(stat.tokens, 1), pattern, plan.target_sparsity)
                _write(layer, weight, mask)
            advance()


def _matrix(layer: Layer) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).float().clone()


def _write(layer: Layer, weight: torch.Tensor, mask: torch.Tensor) -> None:
    owner = layer.owner
    shape, dtype = layer.weight.shape, layer.weight.dtype
    weight = (weight * mask).reshape(shape).to(dtype)
    mask = mask.reshape(shape).to(dtype)
    parametrizations = getattr(owner, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        parametrizations["weight"].original.copy_(weight)
        parametrizations["weight"][0].mask.copy_(mask)
    else:
        owner.weight.copy_(weight)


def _execution_order(model: nn.Module, active: list, batch: tuple) -> list:
    """`active` sorted by when each layer first runs on a calibration batch (layers that never
    run are refused: they could not be calibrated)."""
    seen: dict[int, int] = {}

    def first_call(module, _args):  # returns None: a pre-hook's return value would replace the args
        seen.setdefault(id(module), len(seen))

    hooks = [layer.owner.register_forward_pre_hook(first_call) for layer, _ in active]
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for handle in hooks:
            handle.remove()
    missing = [layer.name for layer, _ in active if id(layer.owner) not in seen]
    if missing:
        raise EdgesparseError(f"layer {missing[0]!r} never runs on the calibration inputs, so it cannot be calibrated",
                              hint="exclude it in the recipe (prune.exclude) or use --prune-method magnitude")
    return sorted(active, key=lambda item: seen[id(item[0].owner)])


def _collect(model: nn.Module, layers: list[Layer], data: list[tuple], full: bool) -> dict[str, _Stats]:
    """Run the calibration batches through the model (whose earlier groups are already pruned)
    and gather each layer's input statistics, stopping each forward after the group's last layer."""
    stats = {layer.name: _Stats(layer, full) for layer in layers}
    pending: set[int] = set()

    def hook_for(layer):
        def hook(module, args):
            stats[layer.name].add(args[0])
            pending.discard(id(module))
            if not pending:
                raise _Stop
        return hook

    hooks = [layer.owner.register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        for batch in data:
            pending.update(id(layer.owner) for layer in layers)
            try:
                model(*batch)
            except _Stop:
                pass
    finally:
        for handle in hooks:
            handle.remove()
    return stats


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the round(sparsity * in) lowest scores of every row (Wanda's comparison group)."""
    k = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, :k], 0.0)
    return mask


def _pattern_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool) -> torch.Tensor:
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(scores, sparsity, pattern.rows, pattern.cols)
    if per_row:
        return _row_mask(scores, sparsity)
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat)
    k = round(sparsity * flat.numel())
    if k:
        mask[torch.sort(flat, stable=True).indices[:k]] = 0.0
    return mask.reshape(scores.shape)


def wanda(weight: torch.Tensor, sq: torch.Tensor, pattern: Pattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) for W [out, in] given the inputs' per-column sum of squares."""
    scores = weight.abs() * sq.sqrt().to(weight.dtype).unsqueeze(0)
    return weight, _pattern_mask(scores, pattern, sparsity, per_row=True)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float,
              blocksize: int = BLOCKSIZE, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weight, mask) for W [out, in] and H = X^T X / tokens [in, in]."""
    W = weight.double().clone()
    rows, cols = W.shape
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    diag = torch.diag(Hinv)
    if pattern.kind == "nm" and blocksize % pattern.m:  # an M-group never straddles two blocks
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    mask = torch.ones_like(W)
    if pattern.kind == "block":  # whole blocks: chosen up front, the score averaged per block
        mask = block_mask((W * W / (diag * diag).unsqueeze(0)).float(), sparsity, pattern.rows, pattern.cols).double()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if pattern.kind == "unstructured":
            scores = W1 * W1 / (torch.diag(Hinv1) ** 2).unsqueeze(0)
            mask[:, i1:i2] = _pattern_mask(scores, pattern, sparsity, per_row=False)
        for i in range(i2 - i1):
            col = i1 + i
            if pattern.kind == "nm" and col % pattern.m == 0:
                d = torch.diag(Hinv)[col : col + pattern.m]
                mask[:, col : col + pattern.m] = nm_mask(W1[:, i : i + pattern.m] ** 2 / (d * d).unsqueeze(0), pattern.n, pattern.m)
            w = W1[:, i]
            q = w * mask[:, col]
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (W * mask).to(weight.dtype), mask.to(weight.dtype)
