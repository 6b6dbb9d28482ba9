"""The seam where sparse kernels plug into export: before torch.export, each layer whose pattern
and dtype have a registered kernel is swapped for a module that calls that kernel's custom op.

Kernel providers register a factory with `register_kernel(pattern_kind, dtype, name, factory)`;
`factory(module, plan)` returns the replacement module, or None to keep the layer dense (for
example when the measured crossover table says dense is faster at this shape). The kernel's name
(the replacement's `kernel_name` attribute if it has one, else `name`) is written into the layer's
plan, so the manifest says what runs where.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each conv's following BatchNorm into it (inference form), so a conv swapped for a
    sparse op does not leave a standalone batch norm behind. Layer names stay the same; zeros stay
    zero (BN scales whole output channels). Models torch.fx cannot trace are returned unchanged."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception:
        return model


def record_activation_rows(model: nn.Module, plans: list[LayerPlan], example_inputs: tuple) -> None:
    """One forward pass to note how many rows each layer sees per call (linear: input rows; conv:
    pixels per image): the kernels' speed, and so the sparse/dense choice, depends on it."""
    by_name = {plan.name: plan for plan in plans}
    hooks = []
    for name, module in model.named_modules():
        plan = by_name.get(name)
        if plan is None:
            continue

        def hook(mod, args, plan=plan):
            x = args[0]
            plan.activation_rows = int(x.shape[-1] * x.shape[-2]) if x.dim() == 4 else int(x.numel() // x.shape[-1])

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in hooks:
            handle.remove()


def swap_sparse_layers(model: nn.Module, plans: list[LayerPlan], example_inputs: tuple | None = None) -> int:
    """Replace eligible layers in place; returns how many were swapped."""
    if example_inputs is not None and _KERNELS:
        record_activation_rows(model, plans, example_inputs)
    swapped = 0
    for plan in plans:
        if not plan.pattern or plan.pattern == "channel":
            continue
        entry = _KERNELS.get((plan.pattern.split(":")[0], plan.dtype))
        if entry is None:
            continue
        name, factory, _ = entry
        parent_name, _, child = plan.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = factory(getattr(parent, child), plan)
        if replacement is not None:
            setattr(parent, child, replacement)
            plan.kernel = getattr(replacement, "kernel_name", name)
            swapped += 1
    return swapped
