"""Quantization for ExecuTorch's XNNPACK backend.

int8 / int8-dynamic go through PT2E (torch.export -> prepare_pt2e -> calibrate -> convert_pt2e)
with ExecuTorch's XNNPACKQuantizer: per-channel int8 weights, per-tensor int8 activations.
int4w is torchao's 8da4w (int4 weights in groups, int8 dynamic activations) on linear layers.
The result still runs in eager torch (as quantize/dequantize ops), which is how we measure the
compressed model's accuracy before export.

A model exported through a wrapper (an LM's decode step with a static KV cache) is quantized in
eager torch on its linear layers (`wrapped=True`): int8-dynamic becomes torchao's 8da8w (per-channel
int8 weights, per-token dynamic int8 activations), the scheme XNNPACK runs for a dynamically
quantized linear. Per-token scaling makes a full-sequence forward compute exactly what the decode
step computes token by token, so perplexity is measured on the model that is exported, and the
wrapper captures the quantized modules like any others. (PT2E would have to capture the raw model,
whose outputs hold a KV cache object, and quantizes activations per tensor: over a whole sequence
that is a different model from the one-token decode step.)
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable, Iterable

import torch
from torch import nn

from edgesparse.errors import EdgesparseError, first_line
from edgesparse.recipe import QuantConfig


def capture(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """torch.export with a one-line error for models it cannot capture."""
    if not isinstance(model, torch.fx.GraphModule):  # PT2E graphs refuse .eval(); they are already
        model.eval()  # in inference form
    try:
        # on failure torch.export prints the partial graph to stderr; our one-line error says enough
        with contextlib.redirect_stderr(io.StringIO()):
            # a module can ask for dynamo's strict capture (transformers' static-cache decode step
            # lowers only from a strict export)
            return torch.export.export(model, tuple(example_inputs), strict=getattr(model, "export_strict", False))
    except Exception as exc:
        first = first_line(exc)
        raise EdgesparseError(
            f"torch.export could not capture the model: {failing_module(model, exc)}: {type(exc).__name__}: {first}",
            hint="remove data-dependent control flow or export it yourself and pass the .pt2",
        ) from None


def failing_module(model: nn.Module, exc: BaseException) -> str:
    """Which module a capture failed in: the innermost frame of the traceback whose `self` is one
    of the model's modules (non-strict capture runs their Python forward), else the model itself
    (e.g. an output that is not a tensor)."""
    names = {id(module): name for name, module in model.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
            found_type = type(owner).__name__
        tb = tb.tb_next
    if not found:
        return f"in the model ({type(model).__name__})"
    return f"in module {found!r} ({found_type})"


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    example_inputs: tuple,
    calib: Iterable[tuple] | None = None,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
    wrapped: bool = False,
) -> tuple[nn.Module, dict]:
    """Return (quantized model, info for the manifest). `model` is left untouched. `wrapped`: the
    model is exported through a wrapper (see the module docstring), so quantize it in eager torch."""
    if cfg.mode == "none":
        return model, {"mode": "none"}
    if cfg.mode == "int4w":
        batches = list(take_batches(calib, cfg.calib_batches)) if calib is not None else []
        quantized, gptq_layers = _linear_dynamic(model, cfg, 4, batches)
        rounding = (f"GPTQ on {len(batches)} calibration batches ({gptq_layers} layers; the rest rounded to nearest)"
                    if gptq_layers else "rounded to nearest")
        return quantized, {"mode": "int4w", "group_size": cfg.group_size,
                           "weights": f"int4 symmetric, per group (bf16 scales, as XNNPACK stores them), {rounding}",
                           "activations": "int8 per-token dynamic"}
    per_token = {"mode": cfg.mode, "weights": "int8 per-channel symmetric", "activations": "int8 per-token dynamic", "layers": "linear"}
    if wrapped and cfg.mode == "int8-dynamic":
        return _linear_dynamic(model, cfg, 8)[0], per_token
    if wrapped:
        raise EdgesparseError(
            f"--quant {cfg.mode} (static int8 activations) cannot be calibrated through this model's export wrapper "
            "(its capture needs the wrapped decode step, and static per-tensor scales are calibrated on whole batches)",
            hint="use --quant int8-dynamic or --quant int4w",
        )

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dynamic = cfg.mode == "int8-dynamic"
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    info = {"mode": cfg.mode, "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor " + ("dynamic" if dynamic else "static")}
    if not dynamic:
        from edgesparse.layers import find_layers

        layers = find_layers(model)
        keep_ends = cfg.keep_first_last_fp32 if cfg.keep_first_last_fp32 is not None else bool(layers) and layers[0].kind == "conv"
        if keep_ends and layers:
            info["fp32_layers"] = fp32 = sorted({layers[0].name, layers[-1].name})
            # the layers' nodes are the ones whose module stack holds them
            quantizer.set_filter_function(lambda node: not {v[0] for v in node.meta.get("nn_module_stack", {}).values()} & set(fp32))
    prepared = prepare_pt2e(capture(model, example_inputs).module(), quantizer)
    batches = []
    if not dynamic:
        batches = list(take_batches(calib, cfg.calib_batches)) if calib is not None else []
        if not batches:
            batches = [tuple(example_inputs)]
            info["warning"] = "no calibration data: calibrated on the example inputs only"
        info["calib_batches"] = len(batches)
    iterator = progress(batches, "calibrating", len(batches)) if progress and batches else batches
    with torch.no_grad():
        for batch in iterator:
            prepared(*batch)
        if dynamic:
            try:
                prepared(*example_inputs)
            except Exception as exc:  # PT2E's rewrite of this graph does not run (seen: transformers' attention-mask indexing)
                note = f"PT2E could not run this model ({first_line(exc)}): quantized in eager torch instead"
                return _linear_dynamic(model, cfg, 8)[0], per_token | {"note": note}
    converted = convert_pt2e(prepared)
    if not dynamic:
        _snap_biases(converted)
        info["bias"] = "int32 on the grid of input scale x weight scale, as XNNPACK stores it (the eager model uses the same values)"
    return converted, info


def _snap_biases(graph: torch.fx.GraphModule) -> None:
    """Round each quantized conv/linear's fp32 bias onto the int32 grid XNNPACK stores it on
    (step = input scale x weight scale per output channel), in place. Left fp32, the eager
    model adds the exact bias where the .pte adds the rounded one: a fraction of an output step
    per layer that flips roundings all through a deep static-int8 network (MobileNetV2: relative
    error 7% between the .pte and its eager reference; with the biases on the grid, 0)."""

    def attr(target: str):
        obj = graph
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def value(arg):
        return attr(arg.target) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else arg

    seen = set()
    for node in graph.graph.nodes:
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default) or len(node.args) < 3:
            continue
        x, weight, bias = node.args[:3]
        quantized = all(isinstance(a, torch.fx.Node) and "dequantize_per" in str(a.target) for a in (x, weight))
        if not quantized or not isinstance(bias, torch.fx.Node) or bias.op != "get_attr" or bias.target in seen:
            continue
        seen.add(bias.target)
        if "per_tensor" not in str(x.target):  # a dynamic (per-token) input scale: XNNPACK keeps that bias fp32
            continue
        step = torch.as_tensor(value(x.args[1]), dtype=torch.float32) * torch.as_tensor(value(weight.args[1]), dtype=torch.float32)
        b = attr(bias.target)
        with torch.no_grad():
            b.copy_(torch.round(b / step).clamp(-(2**31), 2**31 - 1) * step)


def take_batches(iterable: Iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item if isinstance(item, tuple) else (item,)


def _linear_dynamic(model: nn.Module, cfg: QuantConfig, bits: int, calib: list[tuple] | None = None) -> tuple[nn.Module, int]:
    """torchao's 8daNw on every linear: int`bits` symmetric weights (int4: per group of
    cfg.group_size inputs, per row when the input size is not a multiple; int8: per row) with
    per-token dynamic int8 activations. int4 with calibration data and cfg.method gptq or auto:
    the grouped layers' int4 values and scales come from GPTQ. Returns (model, GPTQ'd layers)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.utils import unwrap_tensor_subclass

    model = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgesparseError(f"--quant {cfg.mode} quantizes linear layers here and this model has none", hint="use --quant int8")
    dtype = torch.int4 if bits == 4 else torch.int8
    gptq = {}
    if bits == 4 and calib and cfg.method in ("auto", "gptq"):
        gptq = _gptq(model, cfg, calib)
    elif bits == 4 and cfg.method == "gptq":
        raise EdgesparseError("--quant-method gptq needs calibration inputs and this model has none", hint="use --quant-method rtn")
    if bits == 4:
        grouped = lambda m, _fqn: isinstance(m, nn.Linear) and m.in_features % cfg.group_size == 0  # noqa: E731
        per_row = lambda m, _fqn: isinstance(m, nn.Linear) and m.in_features % cfg.group_size != 0  # noqa: E731
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(cfg.group_size)), grouped)
    else:
        per_row = lambda m, _fqn: isinstance(m, nn.Linear)  # noqa: E731
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerAxis(0)), per_row)
    with torch.no_grad():
        for module in model.modules():
            # XNNPACK stores per-group scales as bf16: round them here so the eager model (the
            # perplexity we report and the verification reference) is the one the .pte runs
            if bits == 4 and grouped(module, "") and isinstance(scale := getattr(module.weight, "scale", None), torch.Tensor):
                scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))
        for name, (values, scales) in gptq.items():
            weight = model.get_submodule(name).weight
            weight.qdata.copy_(values)
            weight.scale.copy_(scales.reshape(weight.scale.shape))
    unwrap_tensor_subclass(model)
    return model, len(gptq)


def _gptq(model: nn.Module, cfg: QuantConfig, calib: list[tuple]) -> dict:
    """GPTQ int4 values and scales for the model's grouped linears (in place: their weights become
    the int4 grid). A weight shared with another module (an LM head tied to the embedding) is left
    to round-to-nearest: writing its grid would change the other module too."""
    from edgesparse.layers import Layer
    from edgesparse.prune_llm import gptq_calibrated

    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    layers = [Layer(name, module, "linear") for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module.in_features % cfg.group_size == 0 and owners[id(module.weight)] == 1]
    return gptq_calibrated(model, layers, calib, cfg.calib_batches, cfg.group_size)
