"""Activation sparsity for LLaMA-style transformers (gated MLPs `down(act(gate x) * up x)`).

Three ways to pick which activations become zero, all calibrated on text to hit a target fraction
(facts: ../shared/notes/papers-digest.md 1.5-1.7):
- CATS: one threshold per MLP on |act(gate x)|; a neuron below it skips its up row and down column.
- CHESS: one threshold per neuron (channel), from the error that zeroing a neuron causes:
  |act_i| * E|up_i x| is cut at the layer's target quantile, so neuron i's threshold is
  T / E|up_i x| (a neuron whose up output is large keeps smaller activations).
- TEAL: one threshold per linear layer on its input (attention q/k/v/o and the MLP's gate/up/down):
  an input below it skips one weight row.

`calibrate` measures the thresholds, `apply` installs them (in torch, so perplexity can be
measured), and `to_kernels` swaps the thresholded layers for the edgesparse activation-sparse ops
(`edgesparse::actsparse_gated_mlp`, `edgesparse::actsparse_linear`) before export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgesparse import _progress
from edgesparse.errors import EdgesparseError

# calibration keeps at most this many values per layer for the quantile (a random subsample)
MAX_SAMPLES = 1 << 22


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module with gate_proj / up_proj / down_proj linears and an act_fn (LLaMA, Qwen, SmolLM2)."""
    found = [(name, m) for name, m in model.named_modules()
             if all(isinstance(getattr(m, k, None), nn.Linear) for k in ("gate_proj", "up_proj", "down_proj"))
             and hasattr(m, "act_fn")]
    if not found:
        raise EdgesparseError("activation sparsity needs gated MLPs (modules with gate_proj, up_proj, down_proj and act_fn)")
    return found


class ThresholdedMLP(nn.Module):
    """A gated MLP with act(gate x) zeroed where |act(gate x)| <= threshold (a scalar for CATS,
    one per neuron for CHESS)."""

    def __init__(self, mlp: nn.Module, threshold: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.register_buffer("threshold", threshold.detach().float().clone())

    def forward(self, x):
        a = self.act_fn(self.gate_proj(x))
        a = a * (a.abs() > self.threshold)
        return self.down_proj(a * self.up_proj(x))


class ThresholdedLinear(nn.Module):
    """A linear whose inputs with |x| <= threshold are zeroed first (TEAL)."""

    def __init__(self, linear: nn.Linear, threshold: float):
        super().__init__()
        self.linear, self.threshold = linear, float(threshold)

    def forward(self, x):
        return self.linear(x * (x.abs() > self.threshold))


@dataclass
class Calibration:
    method: str
    target: float
    thresholds: dict[str, torch.Tensor]  # layer name -> scalar, or per-neuron vector (chess)
    tokens: int

    def to_dict(self) -> dict:
        """For the manifest: scalars as floats, per-neuron vectors summarized (mean, min, max)."""
        out = {}
        for name, t in self.thresholds.items():
            out[name] = float(t) if t.numel() == 1 else {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()), "neurons": t.numel()}
        return {"method": self.method, "target": self.target, "calib_tokens": self.tokens, "thresholds": out}


def _quantile(values: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """The q-quantile of |values| (overall, or along dim), via kthvalue (torch.quantile caps its
    input size)."""
    if dim is None:
        values = values.reshape(-1)
        if values.numel() > MAX_SAMPLES:
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:MAX_SAMPLES]]
        k = max(1, min(values.numel(), round(q * values.numel())))
        return values.kthvalue(k).values
    k = max(1, min(values.shape[dim], round(q * values.shape[dim])))
    return values.kthvalue(k, dim=dim).values


def calibrate(model: nn.Module, chunks: list[torch.Tensor], method: str, target: float, passes: int = 3) -> Calibration:
    """Run the calibration chunks through the model, collect |activations| where the method
    thresholds them, and set each threshold at the `target` quantile. Thresholds upstream change
    what downstream layers see, so after the first (dense) pass the model is run again with the
    thresholds in place and they are re-measured (`passes` in all); `model` is left untouched."""
    if not 0 < target < 1:
        raise EdgesparseError(f"activation-sparsity target must be in (0, 1) (got {target})")
    if method not in ("cats", "chess", "teal"):
        raise EdgesparseError(f"unknown activation-sparsity method {method!r}")
    work = model
    for index in range(passes):
        thresholds = _measure_thresholds(work, chunks, method, target, f"calibrating {method} thresholds ({index + 1}/{passes})")
        if index + 1 < passes:
            work = work if work is not model else copy.deepcopy(model)
            apply(work, Calibration(method, target, thresholds, 0))
    return Calibration(method, target, thresholds, sum(int(c.numel()) for c in chunks))


def _targets(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """The modules `method` thresholds, plain or already thresholded."""
    if method == "teal":
        inner = {id(m.linear) for m in model.modules() if isinstance(m, ThresholdedLinear)}
        return [(name, m) for name, m in model.named_modules()
                if isinstance(m, ThresholdedLinear) or (isinstance(m, nn.Linear) and id(m) not in inner and ".layers." in f".{name}")]
    return gated_mlps(model)


def _measure_thresholds(model: nn.Module, chunks, method: str, target: float, label: str) -> dict[str, torch.Tensor]:
    collected: dict[str, list[torch.Tensor]] = {}
    up_means: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def keep(store, name):
        def hook(module, args, out=None):
            value = (args[0] if out is None else out).detach().abs()
            store.setdefault(name, []).append(value.reshape(-1, value.shape[-1]))
        return hook

    for name, module in _targets(model, method):
        if method == "teal":  # the input, before a ThresholdedLinear zeroes part of it
            hooks.append(module.register_forward_pre_hook(keep(collected, name)))
        else:  # act(gate x), before a ThresholdedMLP zeroes part of it
            hooks.append(module.act_fn.register_forward_hook(lambda m, a, out, k=keep(collected, name): k(m, a, out)))
            if method == "chess":
                hooks.append(module.up_proj.register_forward_hook(lambda m, a, out, k=keep(up_means, name): k(m, a, out)))
    try:
        with torch.no_grad():
            for ids in _progress.track(chunks, label, len(chunks)):
                model(ids)
    finally:
        for handle in hooks:
            handle.remove()
    thresholds = {}
    for name, parts in collected.items():
        values = torch.cat(parts)
        if method == "chess":  # error of zeroing neuron i ~ |a_i| * E|u_i|: cut that at the quantile
            weight = torch.cat(up_means[name]).mean(dim=0).clamp_min(1e-12)
            thresholds[name] = _quantile(values * weight, target) / weight
        else:
            thresholds[name] = _quantile(values, target)
    return thresholds


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply(model: nn.Module, calibration: Calibration) -> nn.Module:
    """Install the thresholds in place (ThresholdedMLP / ThresholdedLinear, or new values for
    layers that already have them); returns the model."""
    for name, threshold in calibration.thresholds.items():
        module = model.get_submodule(name)
        if isinstance(module, ThresholdedLinear):
            module.threshold = float(threshold)
        elif isinstance(module, ThresholdedMLP):
            module.threshold = threshold.detach().float().clone()
        elif calibration.method == "teal":
            _replace(model, name, ThresholdedLinear(module, float(threshold)))
        else:
            _replace(model, name, ThresholdedMLP(module, threshold))
    return model


def measured_sparsity(model: nn.Module, chunks: list[torch.Tensor]) -> dict[str, float]:
    """Per thresholded layer, the fraction of activations that are zero after thresholding."""
    zeros: dict[str, list[float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, ThresholdedMLP):
            def hook(mod, args, name=name):
                a = mod.act_fn(mod.gate_proj(args[0]))
                zeros.setdefault(name, []).append(float((a.abs() <= mod.threshold).float().mean()))
            hooks.append(module.register_forward_pre_hook(hook))
        elif isinstance(module, ThresholdedLinear):
            def hook(mod, args, name=name):
                zeros.setdefault(name, []).append(float((args[0].abs() <= mod.threshold).float().mean()))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in chunks:
                model(ids)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: sum(v) / len(v) for name, v in zeros.items()}


def to_kernels(model: nn.Module, int8: bool = False) -> int:
    """Swap ThresholdedMLP / ThresholdedLinear for the edgesparse activation-sparse op modules
    (same numbers, run by our kernels in ExecuTorch and ONNX Runtime); returns how many. int8:
    the int8-weight ops (per-channel symmetric weights, fp32 activations)."""
    from edgesparse.runtime_kernels.modules import ActSparseGatedMLP, ActSparseLinear

    if int8:
        from edgesparse.runtime_kernels.modules import QActSparseGatedMLP as ActSparseGatedMLP  # noqa: N814
        from edgesparse.runtime_kernels.modules import QActSparseLinear as ActSparseLinear  # noqa: N814

    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, ThresholdedMLP):
            activation = "silu" if isinstance(module.act_fn, nn.SiLU) or type(module.act_fn).__name__.startswith("SiLU") else None
            if activation is None:
                raise EdgesparseError(f"{name}: the activation-sparse kernel supports SiLU MLPs (got {type(module.act_fn).__name__})")
            _replace(model, name, ActSparseGatedMLP(module.gate_proj, module.up_proj, module.down_proj, module.threshold, activation))
        elif isinstance(module, ThresholdedLinear):
            _replace(model, name, ActSparseLinear(module.linear, module.threshold))
        else:
            continue
        swapped += 1
    return swapped


def sparsify(model: nn.Module, bundle, cfg, finetune: bool = True) -> dict:
    """The recipe's act_sparsity step on `model` (in place): calibrate on the bundle's calibration
    text (cfg.calib_tokens), install the thresholds, optionally fine-tune with them in place, and
    return the manifest's record (thresholds, sparsity measured on the calibration text)."""
    if bundle.calib is None:
        raise EdgesparseError(f"{bundle.name} has no calibration data for activation sparsity")
    chunks, tokens = [], 0
    for batch in bundle.calib():
        chunk = batch[0] if isinstance(batch, tuple) else batch
        chunks.append(chunk)
        tokens += chunk.numel()
        if tokens >= cfg.calib_tokens:
            break
    calibration = calibrate(model, chunks, cfg.method, cfg.target)
    apply(model, calibration)
    record = calibration.to_dict()
    if cfg.finetune_steps:
        if not (finetune and bundle.finetune):
            raise EdgesparseError(f"act_sparsity.finetune_steps is set but {bundle.name} has no fine-tune hook")
        record["finetune"] = recover(model, bundle.finetune(), cfg.finetune_steps)
    measured = measured_sparsity(model, chunks)
    record["measured_sparsity"] = {"mean": sum(measured.values()) / len(measured), "per_layer": measured}
    record["kernels"] = ["edgesparse::actsparse_linear (f32)" if cfg.method == "teal" else "edgesparse::actsparse_gated_mlp (f32)"]
    return record


def recover(model: nn.Module, step, steps: int) -> dict:
    """A short recovery fine-tune with the thresholds in place (gradients flow through the
    activations that survive); returns the first and last losses."""
    losses = []
    model.train()
    try:
        with _progress.bar("recovery fine-tune (activation sparsity)", steps) as advance:
            for index in range(steps):
                loss = step(model, index)
                losses.append(float(loss) if loss is not None else float("nan"))
                advance(info=f"loss {losses[-1]:.3f}")
    finally:
        model.eval()
    return {"steps": steps, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:])}
