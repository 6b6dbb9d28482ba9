"""Structured channel pruning: remove a layer's weakest output channels and rewire what reads them.

The model is traced with torch.fx; from each conv/linear producer we follow its single-user chain
through channel-preserving ops (batch norm, activations, pooling, dropout, depthwise conv, flatten)
to the next conv/linear, whose input channels are cut to match. A chain that meets anything else
(a residual add, a concat, a second reader) leaves the producer whole, with the reason in the plan.
The result is a smaller *dense* model.
"""

from __future__ import annotations

import fnmatch
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgesparse.errors import EdgesparseError
from edgesparse.prune import LayerPlan
from edgesparse.recipe import PruneConfig

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, torch.sigmoid, torch.tanh, F.dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def _is_dense_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _chain(gm: fx.GraphModule, producer: fx.Node):
    """Follow the producer's output to its consumer. Returns (between, consumer, spatial, reason):
    modules to cut along the way, the consumer node, how many input features each channel becomes
    after a flatten (1 without one), or a reason why the channels cannot be removed."""
    modules = dict(gm.named_modules())
    between, node, spatial = [], producer, 1
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, None, 1, f"output of {node.name} is read {len(users)} times (residual/branch)"
        node = users[0]
        if node.op == "call_module":
            module = modules[node.target]
            if _is_dense_layer(module):
                return between, node, spatial, None
            if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) or _is_depthwise(module):
                between.append(node.target)
                continue
            if isinstance(module, nn.Flatten) or isinstance(module, _PASS_MODULES):
                if isinstance(module, nn.Flatten):
                    spatial = _flatten_factor(node)
                continue
            return None, None, 1, f"reaches {type(module).__name__} ({node.target})"
        if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
            continue
        if node.op == "call_function" and node.target is torch.flatten:
            spatial = _flatten_factor(node)
            continue
        if node.op == "call_method" and node.target in _PASS_METHODS | {"flatten"}:
            if node.target == "flatten":
                spatial = _flatten_factor(node)
            continue
        return None, None, 1, f"reaches {node.op} {getattr(node.target, '__name__', node.target)}"


def _flatten_factor(node: fx.Node) -> int:
    shape = node.args[0].meta["tensor_meta"].shape
    return int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1


def _keep_indices(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = weight.shape[0]
    keep = max(1, round((1.0 - sparsity) * out))
    norms = weight.detach().reshape(out, -1).abs().sum(dim=1)
    return torch.sort(torch.topk(norms, keep).indices).values


def _slice_out(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of conv/linear/bn/depthwise keeping output channels `keep`."""
    with torch.no_grad():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            new = type(module)(len(keep), module.eps, module.momentum, module.affine, module.track_running_stats)
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name, None) is not None:
                    getattr(new, name).copy_(getattr(module, name)[keep])
            new.num_batches_tracked = module.num_batches_tracked
        elif isinstance(module, nn.Conv2d):
            depthwise = _is_depthwise(module)
            new = nn.Conv2d(
                len(keep) if depthwise else module.in_channels, len(keep), module.kernel_size, module.stride,
                module.padding, module.dilation, len(keep) if depthwise else module.groups,
                module.bias is not None, module.padding_mode,
            )
            new.weight.copy_(module.weight[keep])
            if module.bias is not None:
                new.bias.copy_(module.bias[keep])
        else:
            new = nn.Linear(module.in_features, len(keep), module.bias is not None)
            new.weight.copy_(module.weight[keep])
            if module.bias is not None:
                new.bias.copy_(module.bias[keep])
    return new.train(module.training)


def _slice_in(module: nn.Module, keep: torch.Tensor, spatial: int) -> nn.Module:
    """A copy of the consumer reading only input channels `keep` (each `spatial` features wide)."""
    if spatial > 1:
        keep = (keep[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                len(keep), module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, 1, module.bias is not None, module.padding_mode,
            )
        else:
            new = nn.Linear(len(keep), module.out_features, module.bias is not None)
        new.weight.copy_(module.weight[:, keep])
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.train(module.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prune_channels(model: nn.Module, cfg: PruneConfig, example_inputs: tuple) -> list[LayerPlan]:
    """Remove output channels in place; returns the per-layer plan with old/new shapes."""
    if example_inputs is None:
        raise EdgesparseError("channel pruning needs example inputs to trace the model")
    try:
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # fx cannot trace data-dependent control flow
        raise EdgesparseError(
            f"channel pruning needs a torch.fx-traceable model: {str(exc).splitlines()[0]}",
            hint="use an element pattern (unstructured, block, nm) for this model",
        ) from None
    modules = dict(gm.named_modules())
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], (nn.Conv2d, nn.Linear))]
    plans = []
    last = len(layer_nodes) - 1
    for index, node in enumerate(layer_nodes):
        module = model.get_submodule(node.target)  # may already have lost input channels
        plan = LayerPlan(node.target, "conv" if isinstance(module, nn.Conv2d) else "linear", list(module.weight.shape))
        plans.append(plan)
        sparsity, reason = cfg.target_sparsity, ""
        for rule in cfg.overrides:
            if fnmatch.fnmatchcase(node.target, rule.match):
                sparsity = 0.0 if rule.exclude else (rule.sparsity if rule.sparsity is not None else sparsity)
        if not _is_dense_layer(module):
            reason = "depthwise conv: follows its producer's channels"
        elif cfg.keep_first_last_dense and index in (0, last):
            reason = "first/last layer kept whole (keep_first_last_dense)"
        elif any(fnmatch.fnmatchcase(node.target, glob) for glob in cfg.exclude):
            reason = "excluded by recipe"
        elif sparsity <= 0:
            reason = "target sparsity 0"
        if not reason:
            between, consumer, spatial, reason = _chain(gm, node)
        if reason:
            plan.reason = reason
            continue
        keep = _keep_indices(module.weight, sparsity)
        _replace(model, node.target, _slice_out(module, keep))
        for name in between:
            _replace(model, name, _slice_out(model.get_submodule(name), keep))
        consumer_module = model.get_submodule(consumer.target)
        _replace(model, consumer.target, _slice_in(consumer_module, keep, spatial))
        plan.pattern, plan.target_sparsity = "channel", float(sparsity)
        plan.reason = f"kept {len(keep)}/{module.weight.shape[0]} output channels; rewired {consumer.target}"
    for plan in plans:  # final shapes, and the fraction of the original weights removed
        new_weight = model.get_submodule(plan.name).weight
        plan.sparsity = 1.0 - new_weight.numel() / float(torch.Size(plan.shape).numel())
        plan.shape_after = list(new_weight.shape)
    return plans
