"""Exporters: each takes an `ExportJob` and a destination, writes a verified artifact atomically
and returns its manifest entry."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ExportJob:
    model: nn.Module  # what the .pte holds: quantized (PT2E) and/or with edgesparse ops swapped in
    pruned: nn.Module  # the pruned fp32 model with plain torch layers (ONNX int8 and TFLite start here)
    example_inputs: tuple
    sample_inputs: list[tuple]  # verification inputs
    quant: str = "none"  # none | int8 | int8-dynamic | int4w
    calib: list[tuple] = field(default_factory=list)  # int8 calibration batches
    onnx_sparse_storage: bool = False
    tflite_ops: str = "builtin"  # builtin (sparse weights + DENSIFY) | edgesparse (our custom ops)
    # int8-dynamic with our int8 ops: the fp32 model with them swapped in, which ORT quantizes the rest of
    onnx_source: nn.Module | None = None
    # activation-sparse layers: a neuron whose activation is within float rounding of its threshold
    # can be kept by the artifact and dropped by torch (another summation order), so verification
    # compares by cosine / relative error as for quantized models, not elementwise
    thresholded: bool = False
    # what the .pte must match when that is not `model` (static int8 with our ops swapped into the
    # quantized graph: the graph before the swap)
    reference: nn.Module | None = None

    @property
    def statistical(self) -> bool:
        """Verify by cosine / relative error (quantized or thresholded), not elementwise."""
        return self.quant != "none" or self.thresholded
