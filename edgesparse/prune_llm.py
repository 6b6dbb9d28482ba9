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
A layer that never runs on the calibration inputs (an expert no token was routed to) has no
statistics and is pruned by magnitude.
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
from edgesparse.patterns import block_mask, make_mask, nm_mask
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
    order, idle = _execution_order(model, active, data[0])
    for layer, plan in idle:  # never ran on the calibration inputs (e.g. an unrouted expert): no
        # statistics to weigh the weights with, so they are chosen by magnitude
        weight = _matrix(layer)
        _write(layer, weight, make_mask(weight, Pattern.parse(plan.pattern), plan.target_sparsity))
    if idle:
        _progress.console.print(f"[yellow]{len(idle)} layers never ran on the calibration inputs (e.g. {idle[0][0].name}): pruned by magnitude")
    _sequential(model, order, data, method == "sparsegpt", lambda members, stats: _prune_members(members, stats, method),
                f"{method} pruning ({len(data)} calibration batches)")


def gptq_calibrated(model: nn.Module, layers: list[Layer], calib: Iterable[tuple], batches: int,
                    group_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ (Frantar et al. 2022) int4 for `layers` (linears whose inputs split into groups of
    `group_size`), block by block on the calibration inputs like SparseGPT: each layer's weights
    are written back as their int4 grid values (so the next blocks calibrate on the quantized
    model), and {name: (int4 values as int8 [out, in], scales [out, in // group_size])} returned
    for the quantizer to use as they are. Zero weights (pruned) stay zero."""
    data = [b if isinstance(b, tuple) else (b,) for _, b in zip(range(batches), calib or ())]
    if not data:
        return {}
    order, _idle = _execution_order(model, [(layer, None) for layer in layers], data[0])
    found = {}

    def quantize_members(members, stats):
        for layer, _ in members:
            stat = stats[layer.name]
            weight = _matrix(layer)
            q, scale = gptq_int4(weight, stat.xtx / max(stat.tokens, 1), group_size, keep=weight != 0)
            found[layer.name] = (q, scale)
            _write(layer, q.double().mul(scale.repeat_interleave(group_size, 1).double()).float(), (weight != 0).float())

    _sequential(model, order, data, True, quantize_members, f"GPTQ int4 ({len(data)} calibration batches)")
    return found


def _sequential(model: nn.Module, order: list, data: list[tuple], full: bool, action, title: str) -> None:
    """Run `action(members, stats)` group by group in execution order, each group's statistics
    gathered on the outputs of the groups already processed."""
    groups: dict[str, list] = {}
    for layer, plan in order:
        groups.setdefault(group_key(layer.name), []).append((layer, plan))
    keys = list(groups)
    with torch.no_grad(), _progress.bar(title, len(groups)) as advance:
        i = 0
        while i < len(keys):
            run = _block_run(model, keys[i:])
            # a stack of blocks: capture the first one's inputs once, then block by block
            if len(run) > 1 and _process_stack(model, [(model.get_submodule(key), groups[key]) for key in run], data, full, action, advance):
                i += len(run)
                continue
            members = groups[keys[i]]
            action(members, _collect(model, [layer for layer, _ in members], data, full))
            advance()
            i += 1


def _prune_members(members: list, stats: dict, method: str) -> None:
    for layer, plan in members:
        pattern = Pattern.parse(plan.pattern)
        stat = stats[layer.name]
        if method == "wanda":
            weight, mask = wanda(_matrix(layer), stat.sq, pattern, plan.target_sparsity)
        else:
            weight, mask = sparsegpt(_matrix(layer), stat.xtx / max(stat.tokens, 1), pattern, plan.target_sparsity)
        _write(layer, weight, mask)


def _block_run(model: nn.Module, keys: list[str]) -> list[str]:
    """The leading keys that name consecutive elements of one ModuleList (`model.layers.3`,
    `model.layers.4`, ...): a stack of blocks that transformers-style models apply in sequence."""
    run = []
    for key in keys:
        parent, _, index = key.rpartition(".")
        if not index.isdigit() or not isinstance(model.get_submodule(parent) if parent else model, nn.ModuleList):
            break
        if run and (parent != run[-1].rpartition(".")[0] or int(index) != int(run[-1].rpartition(".")[2]) + 1):
            break
        run.append(key)
    return run


def _no_cache(kwargs: dict) -> dict:
    """A block's keyword inputs without a KV cache (each block is run more than once here)."""
    out = {}
    for key, value in kwargs.items():
        if any(cls.__name__.endswith("Cache") for cls in type(value).__mro__):
            value = None
        elif key == "use_cache":
            value = False
        out[key] = value
    return out


def _process_stack(model: nn.Module, blocks: list, data: list[tuple], full: bool, action, advance) -> bool:
    """Sequential processing (pruning, quantization) of a stack of blocks, each run on its own: the first block's inputs
    (hidden states plus keyword inputs such as the attention mask and rotary embeddings) are
    captured once; each block's output on the pruned block is the next block's input."""
    inputs = []

    def catch(_module, args, kwargs):
        inputs.append((args, _no_cache(kwargs)))
        raise _Stop

    handle = blocks[0][0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in data:
            try:
                model(*batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not all(args and isinstance(args[0], torch.Tensor) for args, _ in inputs):
        return False  # hidden states not passed positionally: use the generic path
    for block, members in blocks:
        stats = {layer.name: _Stats(layer, full) for layer, _ in members}
        hooks = [layer.owner.register_forward_pre_hook(lambda m, args, layer=layer: stats[layer.name].add(args[0]))
                 for layer, _ in members]
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for handle in hooks:
                handle.remove()
        action(members, stats)
        outputs = []
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(((hidden,) + tuple(args[1:]), kwargs))
        inputs = outputs
        advance()
    return True


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


def _execution_order(model: nn.Module, active: list, batch: tuple) -> tuple[list, list]:
    """(`active` layers that run on a calibration batch, sorted by when each first runs; those
    that never run)."""
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
    ran = [item for item in active if id(item[0].owner) in seen]
    return sorted(ran, key=lambda item: seen[id(item[0].owner)]), [item for item in active if id(item[0].owner) not in seen]


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


def _inverse_hessian(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W in float64 with the weights of never-active inputs zeroed, the upper Cholesky factor of
    the dampened H^-1), the OBS quantities SparseGPT and GPTQ both walk the columns with."""
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    return W, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def int4_scale(group: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 scale per row of `group` [rows, g]: max |w| / 7.5 (torchao's choice for
    [-8, 7]), rounded to bf16 as XNNPACK stores it."""
    scale = group.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 7.5
    return scale.to(torch.bfloat16).double()


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, keep: torch.Tensor | None = None,
              blocksize: int = BLOCKSIZE, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 values as int8 [out, in], float32 scales [out, in // group_size]) for W [out, in] and
    H = X^T X / tokens: columns quantized left to right, each one's error pushed onto the columns
    not yet quantized; a group's scale is taken from its weights as they stand when the group
    starts. `keep` (bool, W's shape): weights outside it become exactly zero (a pruning mask)."""
    W, Hinv = _inverse_hessian(weight, hessian, damp)
    rows, cols = W.shape
    if cols % group_size:
        raise EdgesparseError(f"GPTQ: {cols} inputs do not split into groups of {group_size}")
    blocksize = max(group_size, blocksize - blocksize % group_size)  # a group never straddles two blocks
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // group_size, dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                scales[:, col // group_size] = int4_scale(W1[:, i : i + group_size])
            scale = scales[:, col // group_size]
            q = torch.clamp(torch.round(W1[:, i] / scale), -8, 7) * keep[:, col]
            Q[:, col] = q.to(torch.int8)
            err = (W1[:, i] - q * scale) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales.float()


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float,
              blocksize: int = BLOCKSIZE, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weight, mask) for W [out, in] and H = X^T X / tokens [in, in]."""
    W, Hinv = _inverse_hessian(weight, hessian, damp)
    rows, cols = W.shape
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
