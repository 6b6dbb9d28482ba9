"""Quantization for ExecuTorch's XNNPACK backend.

int8 / int8-dynamic go through PT2E (torch.export -> prepare_pt2e -> calibrate -> convert_pt2e)
with ExecuTorch's XNNPACKQuantizer: per-channel int8 weights, per-tensor int8 activations.
int4w is torchao's 8da4w (int4 weights in groups, int8 dynamic activations) on linear layers.
The result still runs in eager torch (as quantize/dequantize ops), which is how we measure the
compressed model's accuracy before export.
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
            f"torch.export could not capture the model: {type(exc).__name__}: {first}",
            hint="remove data-dependent control flow or export it yourself and pass the .pt2",
        ) from None


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    example_inputs: tuple,
    calib: Iterable[tuple] | None = None,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
) -> tuple[nn.Module, dict]:
    """Return (quantized model, info for the manifest). `model` is left untouched."""
    if cfg.mode == "none":
        return model, {"mode": "none"}
    if cfg.mode == "int4w":
        return _int4w(model, cfg), {"mode": "int4w", "group_size": cfg.group_size}

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dynamic = cfg.mode == "int8-dynamic"
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    prepared = prepare_pt2e(capture(model, example_inputs).module(), quantizer)
    info = {"mode": cfg.mode, "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor " + ("dynamic" if dynamic else "static")}
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
            prepared(*example_inputs)
    return convert_pt2e(prepared), info


def take_batches(iterable: Iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item if isinstance(item, tuple) else (item,)


def _int4w(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.utils import unwrap_tensor_subclass

    model = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgesparseError("int4w quantizes linear layers and this model has none", hint="use --quant int8")
    grouped = lambda m, _fqn: isinstance(m, nn.Linear) and m.in_features % cfg.group_size == 0  # noqa: E731
    per_row = lambda m, _fqn: isinstance(m, nn.Linear) and m.in_features % cfg.group_size != 0  # noqa: E731
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(cfg.group_size)), grouped)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0)), per_row)
    unwrap_tensor_subclass(model)
    return model
