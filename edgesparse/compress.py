"""`compress(model, recipe)`: prune (one-shot or gradually inside the user's fine-tune loop), then
quantize, in one call. Returns the compressed model and the per-layer plan for the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from edgesparse import _progress
from edgesparse.channel import prune_channels
from edgesparse.errors import EdgesparseError
from edgesparse.layers import set_training
from edgesparse.prune import LayerPlan, Pruner
from edgesparse.quantize import quantize
from edgesparse.recipe import Recipe

# A fine-tune hook runs one training step: hook(model, step) -> optional loss.
FinetuneHook = Callable[[nn.Module, int], "float | None"]


@dataclass
class CompressResult:
    model: nn.Module  # what gets exported (quantized when the recipe says so)
    pruned: nn.Module  # the pruned fp32 model, before quantization
    recipe: Recipe
    layers: list[LayerPlan]
    quant: dict = field(default_factory=dict)
    prune_method: str = "magnitude"  # what chose the weights (PruneConfig.method with `auto` resolved)

    @property
    def sparsity_overall(self) -> float:
        """Zeros (or removed weights, for channel pruning) over all conv/linear weights."""
        total = sum(torch.Size(p.shape).numel() for p in self.layers)
        removed = sum(p.sparsity * torch.Size(p.shape).numel() for p in self.layers)
        return removed / total if total else 0.0


def compress(
    model: nn.Module,
    recipe: Recipe,
    *,
    example_inputs: tuple | None = None,
    calib: Iterable[tuple] | None = None,
    finetune: FinetuneHook | None = None,
    wrapped: bool = False,
) -> CompressResult:
    """Apply `recipe` to `model` (pruning happens in place, like torchao's `sparsify_`).

    With a `finetune` hook and `recipe.prune.schedule.steps > 0`, pruning is gradual: before each
    step the masks follow the cubic schedule, and `finetune(model, step)` trains one step with the
    masks held. Without a hook, pruning is one-shot. Channel pruning happens once, at the
    schedule's begin step (or immediately), and the fine-tune steps then train the smaller model:
    a hook should build its optimizer from `model.parameters()` at step 0.

    `wrapped`: the model is exported through a wrapper (an LM's decode step), so quantization
    works on its modules in eager torch rather than capturing the model (see `quantize`).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an edgesparse.Recipe, got {type(recipe).__name__}")
    cfg = recipe.prune
    if cfg.parsed_pattern.kind == "channel" and cfg.active and example_inputs is None:
        raise EdgesparseError("channel pruning needs example_inputs")
    if recipe.quant.mode != "none" and example_inputs is None:
        raise EdgesparseError("quantization needs example_inputs")
    steps = cfg.schedule.steps if finetune is not None else 0
    if cfg.schedule.steps and finetune is None:
        _progress.console.print("[yellow]schedule.steps is set but no fine-tune hook was given: pruning one-shot")

    method = "magnitude"
    if cfg.parsed_pattern.kind == "channel":
        layers = _channel_with_finetune(model, recipe, example_inputs, finetune, steps)
    else:
        method = resolve_method(model, cfg, calib is not None, steps)
        if method != "magnitude" and calib is not None:  # pruning and quantization both read it
            from edgesparse.quantize import take_batches

            calib = list(take_batches(calib, max(cfg.calib_batches, recipe.quant.calib_batches)))
        layers = _elements_with_finetune(model, recipe, finetune, steps, method, calib)
    set_training(model, False)
    quantized, quant_info = quantize(model, recipe.quant, example_inputs, calib, progress=_progress.track, wrapped=wrapped)
    if recipe.quant.mode != "none":
        fp32 = set(quant_info.get("fp32_layers", ()))
        for plan in layers:
            if (recipe.quant.mode != "int4w" or plan.kind == "linear") and plan.name not in fp32:
                plan.dtype = "int4" if recipe.quant.mode == "int4w" else "int8"
    return CompressResult(quantized, model, recipe, layers, quant_info, method if cfg.active else "none")


def resolve_method(model: nn.Module, cfg, has_calib: bool, steps: int) -> str:
    """The pruning method `auto` stands for (see PruneConfig.method)."""
    if cfg.method != "auto":
        return cfg.method
    if steps or not has_calib or cfg.scope == "global":
        return "magnitude"
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return "wanda" if layers and all(isinstance(m, nn.Linear) for m in layers) else "magnitude"


def _elements_with_finetune(model, recipe, finetune, steps, method="magnitude", calib=None) -> list[LayerPlan]:
    pruner = Pruner(model, recipe.prune)
    schedule = recipe.prune.schedule
    if not pruner.active:
        return pruner.finish()
    pruner.attach()
    try:
        if method != "magnitude":
            from edgesparse.prune_llm import prune_calibrated

            # one-shot and calibrated; fine-tune steps, if any, recover with the masks held fixed
            prune_calibrated(model, [(layer, plan) for layer, plan, _ in pruner.active], method, calib, recipe.prune.calib_batches)
            if steps:
                set_training(model, True)
                with _progress.bar(f"recovery fine-tune ({method} masks held)", steps) as advance:
                    for step in range(steps):
                        loss = finetune(model, step)
                        advance(info=f"loss {loss:.4f}" if isinstance(loss, float) else "")
        elif not steps:
            pruner.update(1.0)
        else:
            target = recipe.prune.target_sparsity or 1.0
            set_training(model, True)
            with _progress.bar("fine-tuning (gradual pruning)", steps) as advance:
                for step in range(steps):
                    if schedule.is_update_step(step):
                        pruner.update(schedule.sparsity_at(step, target) / target)
                    loss = finetune(model, step)
                    advance(info=f"loss {loss:.4f}" if isinstance(loss, float) else "")
            pruner.update(1.0)  # a no-op if the schedule already ended, exact otherwise
    finally:
        layers = pruner.finish()
    return layers


def _channel_with_finetune(model, recipe, example_inputs, finetune, steps) -> list[LayerPlan]:
    set_training(model, False)  # trace and measure in inference mode
    layers = prune_channels(model, recipe.prune, example_inputs)
    if steps:
        set_training(model, True)
        with _progress.bar("fine-tuning (after channel pruning)", steps) as advance:
            for step in range(steps):
                loss = finetune(model, step)
                advance(info=f"loss {loss:.4f}" if isinstance(loss, float) else "")
    return layers
