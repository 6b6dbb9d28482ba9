"""Element-pattern pruning (unstructured, block, N:M): per-layer plans, masks that stay applied
through fine-tuning, and the gradual schedule.

Masks are torch parametrizations (weight = original * mask), so any optimizer in the user's loop
updates `original` while the effective weight keeps its zeros; `finish()` bakes the zeros in.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgesparse.layers import Layer, find_layers
from edgesparse.patterns import _lowest_k_mask, make_mask, pattern_fits
from edgesparse.recipe import Pattern, PruneConfig


@dataclass
class LayerPlan:
    """One layer's line in the manifest: what was asked, what was done, and why."""

    name: str
    kind: str
    shape: list[int]
    pattern: str | None = None  # None: stays dense
    target_sparsity: float = 0.0
    sparsity: float = 0.0  # measured zeros / elements of the final weight
    dtype: str = "float32"
    kernel: str = "dense-xnnpack"
    reason: str = ""
    shape_after: list[int] | None = None  # channel pruning only: the smaller dense shape
    activation_rows: int | None = None  # rows the layer sees per call (batch, or pixels for 1x1 conv)
    computes: str | None = None  # "linear" / "conv1x1" when its forward is one on its own weight, else "other"
    batchnorm: str | None = None  # convs: "folded <bn>" or why the following BatchNorm was not folded

    def to_dict(self) -> dict:
        return asdict(self)


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def plan_layers(model: nn.Module, cfg: PruneConfig) -> list[tuple[Layer, LayerPlan, bool]]:
    """Decide per layer: pattern and target sparsity, or dense with the reason. The flag says
    whether the layer joins the global magnitude pool (global scope, no override of its own)."""
    layers = find_layers(model)
    default_pattern = cfg.parsed_pattern
    plans = []
    for index, layer in enumerate(layers):
        plan = LayerPlan(layer.name, layer.kind, list(layer.weight.shape))
        pattern, sparsity, reason = default_pattern, cfg.target_sparsity, ""
        if cfg.keep_first_last_dense and index in (0, len(layers) - 1):
            reason = "first/last layer kept dense (keep_first_last_dense)"
        elif any(fnmatch.fnmatchcase(layer.name, glob) for glob in cfg.exclude):
            reason = "excluded by recipe"
        elif layer.depthwise:
            reason = "depthwise conv: too few weights to gain from sparsity"
        explicit = False
        for rule in cfg.overrides:  # the last matching rule wins
            if fnmatch.fnmatchcase(layer.name, rule.match):
                explicit = True
                if rule.exclude:
                    reason = f"excluded by override {rule.match!r}"
                    continue
                reason = ""
                if rule.pattern is not None:
                    pattern = Pattern.parse(rule.pattern)
                    sparsity = pattern.implied_sparsity if pattern.implied_sparsity is not None else sparsity
                if rule.sparsity is not None:
                    sparsity = rule.sparsity
        if not reason and (misfit := pattern_fits(pattern, layer.matrix_shape)):
            reason = f"{pattern} does not fit: {misfit}"
        if not reason and sparsity <= 0:
            reason = "target sparsity 0"
        if reason:
            plan.reason = reason
        else:
            plan.pattern, plan.target_sparsity = str(pattern), float(sparsity)
        plans.append((layer, plan, cfg.scope == "global" and not explicit))
    return plans


class Pruner:
    """Holds the masks of every pruned layer between `attach()` and `finish()`."""

    def __init__(self, model: nn.Module, cfg: PruneConfig):
        self.model, self.cfg = model, cfg
        self.plans = plan_layers(model, cfg)
        self.active = [(layer, plan, pooled) for layer, plan, pooled in self.plans if plan.pattern]

    def attach(self) -> None:
        for layer, _, _ in self.active:
            parametrize.register_parametrization(layer.owner, "weight", _Mask(torch.ones_like(layer.weight)))

    def update(self, fraction: float) -> None:
        """Recompute masks at `fraction` (0..1) of each layer's target sparsity, from the
        magnitudes of the current effective weights (already-pruned weights stay pruned)."""
        with torch.no_grad():
            pool = []
            for layer, plan, pooled in self.active:
                pattern = Pattern.parse(plan.pattern)
                if pooled:
                    pool.append(layer)
                    continue
                sparsity = plan.target_sparsity if pattern.kind == "nm" else plan.target_sparsity * fraction
                self._mask_of(layer).copy_(make_mask(layer.weight, pattern, sparsity))
            if pool:
                self._update_global(pool, self.cfg.target_sparsity * fraction)

    def _update_global(self, layers: list[Layer], sparsity: float) -> None:
        scores = torch.cat([layer.weight.detach().abs().reshape(-1).float() for layer in layers])
        mask = _lowest_k_mask(scores, round(sparsity * scores.numel()))
        offset = 0
        for layer in layers:
            n = layer.weight.numel()
            self._mask_of(layer).copy_(mask[offset : offset + n].reshape(layer.weight.shape))
            offset += n

    @staticmethod
    def _mask_of(layer: Layer) -> torch.Tensor:
        return layer.owner.parametrizations["weight"][0].mask

    def finish(self) -> list[LayerPlan]:
        """Bake masks into plain weights and measure every layer's final sparsity."""
        for layer, _, _ in self.active:
            parametrize.remove_parametrizations(layer.owner, "weight", leave_parametrized=True)
        for layer, plan, _ in self.plans:
            plan.sparsity = float((layer.weight == 0).float().mean())
            plan.dtype = str(layer.weight.dtype).removeprefix("torch.")
        return [plan for _, plan, _ in self.plans]
