"""The seam where sparse kernels plug into export: before torch.export, each layer whose pattern
and dtype have a registered kernel is swapped for a module that calls that kernel's custom op.

Kernel providers register a factory with `register_kernel(pattern_kind, dtype, name, factory)`;
`factory(module, plan)` returns the replacement module, or None to keep the layer dense (for
example when the measured crossover table says dense is faster at this shape). The kernel's name
(the replacement's `kernel_name` attribute if it has one, else `name`) is written into the layer's
plan, so the manifest says what runs where.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves

from edgesparse.errors import first_line
from edgesparse.prune import LayerPlan

KernelFactory = Callable[[nn.Module, LayerPlan], "nn.Module | None"]
_KERNELS: dict[tuple[str, str], tuple[str, KernelFactory, bool]] = {}  # (name, factory, builtin)


def register_kernel(pattern_kind: str, dtype: str, name: str, factory: KernelFactory, builtin: bool = False) -> None:
    """builtin=True (edgesparse's own kernels): only if nothing else is registered for that
    pattern kind and dtype, so a user's kernel always takes precedence."""
    key = (pattern_kind, dtype)
    if builtin and key in _KERNELS and not _KERNELS[key][2]:
        return
    _KERNELS[key] = (name, factory, builtin)


def unregister_kernel(pattern_kind: str, dtype: str) -> None:
    _KERNELS.pop((pattern_kind, dtype), None)


def has_kernels(dtype: str = "float32") -> bool:
    return any(key[1] == dtype for key in _KERNELS)


_CONV_OPS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
_BN_OPS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default}


def fold_batchnorm(model: nn.Module, example_inputs: tuple) -> dict[str, str]:
    """Fold each conv's BatchNorm into the conv's own weight and bias, in place, where that BN alone
    consumes the conv's output. The pairs come from a torch.export graph of the model, so convs
    from any library (subclasses, functional calls on a module's weight) are seen by what they
    compute. Module names and identity stay; a plain BatchNorm is replaced by nn.Identity, any
    other becomes an identity BN. Zeros stay zero (BN scales whole output channels). Each fold is
    checked against the model's output on `example_inputs`, and a fold that changes it is undone.

    Returns {conv name: "folded <bn>" or why its BatchNorm was not folded}."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    try:
        program = torch.export.export(model, tuple(example_inputs))
    except Exception as exc:  # the BNs stay (the format exporters report their own capture errors)
        why = f"BatchNorm not folded: torch.export could not capture the model ({first_line(exc)})"
        return {name: why for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    signature = program.graph_signature
    owners = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}

    def owner(node) -> str | None:
        target = owners.get(getattr(node, "name", None))
        return target.rpartition(".")[0] if target else None

    def bn_owner(bn) -> str | None:
        return owner(bn.args[1]) or owner(bn.args[3])

    calls = Counter(owner(n.args[1]) for n in program.graph.nodes if n.target in _CONV_OPS)
    calls.update(bn_owner(n) for n in program.graph.nodes if n.target in _BN_OPS)
    report, pairs = {}, []
    for conv in (n for n in program.graph.nodes if n.target in _CONV_OPS):
        users, conv_name = list(conv.users), owner(conv.args[1])
        if conv_name is None or len(users) != 1 or users[0].target not in _BN_OPS or users[0].args[0] is not conv:
            continue
        bn_name = bn_owner(users[0])
        bn = model.get_submodule(bn_name) if bn_name is not None else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            report[conv_name] = f"BatchNorm {bn_name} not folded: it does not use running statistics"
        elif calls[conv_name] != 1 or calls[bn_name] != 1:
            report[conv_name] = f"BatchNorm {bn_name} not folded: the conv or the BN runs more than once per forward"
        else:
            pairs.append((conv_name, bn_name))
    with torch.no_grad():
        reference = model(*example_inputs)
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            undo = _fold_into(conv, bn)
            if _same(model(*example_inputs), reference):
                report[conv_name] = f"folded {bn_name}"
            else:  # the module's forward does not use its weight/bias as a conv does
                undo()
                report[conv_name] = f"BatchNorm {bn_name} not folded: folding changed the model's output"
    for conv_name, bn_name in pairs:
        if report[conv_name].startswith("folded") and type(model.get_submodule(bn_name)) in _PLAIN_BN:
            parent, _, child = bn_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return report


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_into(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm):
    """conv <- BN(conv), and the BN becomes an identity; returns a function that undoes both."""
    saved_weight = conv.weight.detach().clone()
    saved_bias = None if conv.bias is None else conv.bias.detach().clone()
    saved_bn = {k: v.clone() for k, v in bn.state_dict().items()}
    scale = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.bias is not None else 0.0) - bn.running_mean * scale
    bias = shift + (saved_bias * scale if saved_bias is not None else 0.0)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    if saved_bias is None:
        conv.bias = nn.Parameter(bias.detach().clone())
    else:
        conv.bias.copy_(bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
        bn.bias.zero_()

    def undo():
        conv.weight.copy_(saved_weight)
        conv.bias = None if saved_bias is None else nn.Parameter(saved_bias)
        bn.load_state_dict(saved_bn)

    return undo


def _same(output, reference, rtol: float = 1e-4) -> bool:
    got, want = tree_leaves(output), tree_leaves(reference)
    return len(got) == len(want) and all(
        not isinstance(w, torch.Tensor) or (g.shape == w.shape and float((g - w).abs().max()) <= rtol * max(1.0, float(w.abs().max())))
        for g, w in zip(got, want))


def observe_layers(model: nn.Module, plans: list[LayerPlan], example_inputs: tuple) -> None:
    """One forward pass that notes, per planned layer, how many rows it sees per call (linear:
    input rows; conv: pixels per image; the kernels' speed, and so the sparse/dense choice,
    depends on it) and what it computes: "linear" or "conv1x1" when its output equals a plain
    linear / stride-1 unpadded 1x1 conv of its own weight and bias on that input (whatever its
    class or forward looks like), else "other". A layer the forward never calls stays None."""
    by_name = {plan.name: plan for plan in plans}
    hooks = []
    for name, module in model.named_modules():
        plan = by_name.get(name)
        if plan is None:
            continue
        plan.computes = None

        def hook(mod, args, output, plan=plan):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                plan.computes = "other"
                return
            plan.activation_rows = int(x.shape[-1] * x.shape[-2]) if x.dim() == 4 else int(x.numel() // max(x.shape[-1], 1))
            computes = _plain_op(mod, x, output)
            plan.computes = computes if plan.computes in (None, computes) else "other"

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in hooks:
            handle.remove()


def _plain_op(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or x.dtype != weight.dtype:
        return "other"
    if bias is not None and not isinstance(bias, torch.Tensor):
        return "other"
    try:
        if weight.dim() == 2 and x.shape[-1] == weight.shape[1]:
            op, reference = "linear", F.linear(x, weight, bias)
        elif weight.dim() == 4 and weight.shape[2:] == (1, 1) and x.dim() == 4 and x.shape[1] == weight.shape[1]:
            op, reference = "conv1x1", F.conv2d(x, weight, bias)
        else:
            return "other"
    except RuntimeError:
        return "other"
    return op if _same(y, reference) else "other"


def swap_sparse_layers(model: nn.Module, plans: list[LayerPlan], example_inputs: tuple | None = None,
                       quantized: bool = False) -> int:
    """Replace eligible layers in place; returns how many were swapped. Every pruned layer's plan
    ends with a reason for its kernel choice (the factory's, or why no factory was asked).
    `quantized`: the model is already quantized (its layers are the quantizer's), so no factory
    runs and each plan only says why its layer stays dense. Int8 factories run on the fp32 model
    before quantization (pipeline.export_model with --quant int8-dynamic)."""
    if example_inputs is not None and _KERNELS and not quantized:
        observe_layers(model, plans, example_inputs)
    swapped = 0
    for plan in plans:
        if not plan.pattern or plan.pattern == "channel":
            continue
        entry = None if quantized else _KERNELS.get((plan.pattern.split(":")[0], plan.dtype))
        if entry is None:
            plan.reason = plan.reason or _no_kernel_reason(plan)
            continue
        if example_inputs is not None and plan.computes is None:
            plan.reason = "the model's forward did not call this layer on the example input: left as it is"
            continue
        name, factory, _ = entry
        parent_name, _, child = plan.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plan.reason = ""
        replacement = factory(getattr(parent, child), plan)
        if replacement is not None:
            setattr(parent, child, replacement)
            plan.kernel = getattr(replacement, "kernel_name", name)
            swapped += 1
        plan.reason = plan.reason or f"kept dense by the {name} kernel factory"
    return swapped


def _no_kernel_reason(plan: LayerPlan) -> str:
    if not _KERNELS:
        return "dense: the edgesparse kernels are not built (run `make kernels`), so nothing runs sparse"
    if plan.dtype != "float32":
        return (f"dense {plan.dtype} in the runtime's own kernels: no edgesparse {plan.dtype} kernel runs {plan.pattern} here"
                + (" (pruned Linear layers run on our int8 kernels with --quant int8-dynamic)" if plan.dtype == "int8" else ""))
    return f"dense: no edgesparse kernel is registered for {plan.pattern} ({plan.dtype})"
