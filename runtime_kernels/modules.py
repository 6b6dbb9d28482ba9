"""Modules that call the edgesparse:: ops, and the factory export uses to swap layers for them.

A layer is swapped when its pattern has a kernel (block Rx1 with R in {1, 2, 4, 8}, or
unstructured as R = 1), it is fp32, it is a Linear or a 1x1 stride-1 unpadded Conv2d, and its
sparsity reaches the measured crossover for its shape (crossover.py); otherwise it stays dense in
XNNPACK, and its plan says why.
"""

from __future__ import annotations

import torch
from torch import nn

from edgesparse.recipe import Pattern
from edgesparse.runtime_kernels import crossover, ops  # noqa: F401  (ops defines torch.ops.edgesparse.*)
from edgesparse.runtime_kernels.formats import BCSR, pack_bcsr, pack_qs8_bcsr

BLOCK_ROWS = (1, 2, 4, 8)


def _hold_bcsr(module: nn.Module, packed: BCSR, bias: torch.Tensor | None) -> None:
    """The packed weights and bias as buffers (they travel into the .pte / .onnx), and the shape."""
    module.register_buffer("values", packed.values)
    module.register_buffer("col_idx", packed.col_idx)
    module.register_buffer("row_ptr", packed.row_ptr)
    module.register_buffer("bias", None if bias is None else bias.detach().float().clone())
    module.block_rows, module.in_features, module.out_features = packed.block_rows, packed.in_features, packed.out_features


class _BCSRModule(nn.Module):
    op = None

    def __init__(self, weight2d: torch.Tensor, bias: torch.Tensor | None, block_rows: int):
        super().__init__()
        _hold_bcsr(self, pack_bcsr(weight2d, block_rows), bias)

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::{self.op_name} ({self.block_rows}x1, f32)"

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():  # an ai.edgesparse node, run by the ONNX Runtime op library
            return torch.onnx.ops.symbolic(
                f"ai.edgesparse::{self.onnx_op}", (x, self.values, self.col_idx, self.row_ptr, self.bias),
                {"block_rows": self.block_rows, "in_features": self.in_features, "out_features": self.out_features},
                dtype=x.dtype, shape=self.output_shape(x), version=1)
        return self.op(x, self.values, self.col_idx, self.row_ptr, self.bias, self.block_rows, self.in_features, self.out_features)


class SparseLinear(_BCSRModule):
    op, op_name, onnx_op = torch.ops.edgesparse.bcsr_linear, "bcsr_linear", "BcsrLinear"

    def output_shape(self, x):
        return (*x.shape[:-1], self.out_features)


class SparseConv1x1(_BCSRModule):
    op, op_name, onnx_op = torch.ops.edgesparse.bcsr_conv1x1, "bcsr_conv1x1", "BcsrConv1x1"

    def output_shape(self, x):
        return (x.shape[0], self.out_features, x.shape[2], x.shape[3])


class QSparseLinear(nn.Module):
    """A pruned Linear as int8 BCSR (per-output-channel weight scales, per-row dynamic int8
    activations, int32 sums), run by edgesparse::qs8_bcsr_linear."""

    def __init__(self, weight2d: torch.Tensor, bias: torch.Tensor | None, block_rows: int):
        super().__init__()
        packed, scales = pack_qs8_bcsr(weight2d, block_rows)
        _hold_bcsr(self, packed, bias)
        self.register_buffer("scales", scales)

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::qs8_bcsr_linear ({self.block_rows}x1, int8)"

    def forward(self, x):
        return torch.ops.edgesparse.qs8_bcsr_linear(x, self.values, self.col_idx, self.row_ptr, self.scales, self.bias,
                                                    self.block_rows, self.in_features, self.out_features)


class ActSparseLinear(nn.Module):
    """A Linear whose inputs with |x| <= threshold are skipped (TEAL / CATS activation sparsity),
    run by edgesparse::actsparse_linear. threshold=0 is exact and skips the zeros a ReLU makes;
    a larger threshold trades accuracy for speed (issue 5 calibrates it per layer)."""

    def __init__(self, linear: nn.Linear, threshold: float = 0.0):
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.threshold = float(threshold)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    kernel_name = "edgesparse::actsparse_linear (f32)"

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic(
                "ai.edgesparse::ActSparseLinear", (x, self.weight_t, self.bias), {"threshold": self.threshold},
                dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
        return torch.ops.edgesparse.actsparse_linear(x, self.weight_t, self.bias, self.threshold)


def block_rows_for(pattern: Pattern) -> int | None:
    if pattern.kind == "unstructured":
        return 1
    if pattern.kind == "block" and pattern.cols == 1 and pattern.rows in BLOCK_ROWS:
        return pattern.rows
    return None


def _op_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1):
        return "conv1x1"
    return None


def swap_factory(module: nn.Module, plan) -> nn.Module | None:
    rows, op = block_rows_for(Pattern.parse(plan.pattern)), _op_of(module)
    if rows is None or op is None:
        return None
    weight = module.weight.reshape(module.weight.shape[0], -1)
    threshold, source = crossover.min_sparsity(op, plan.pattern, plan.activation_rows, weight.shape[1], weight.shape[0])
    if threshold is None or plan.sparsity < threshold:
        plan.reason = (f"dense XNNPACK was faster at every measured sparsity ({source})" if threshold is None
                       else f"below the {threshold:.0%} sparsity where the sparse kernel wins ({source})")
        return None
    plan.reason = f"sparse from {threshold:.0%} ({source})"
    return (SparseLinear if op == "linear" else SparseConv1x1)(weight, module.bias, rows)


def register() -> None:
    from edgesparse.converters.sparse_swap import register_kernel

    for kind in ("block", "unstructured"):
        register_kernel(kind, "float32", "edgesparse-bcsr", swap_factory)
