"""Modules that call the edgesparse:: ops, and the factory export uses to swap layers for them.

A layer is swapped when its pattern has a kernel (block Rx1 with R in {1, 2, 4, 8}, block 1xC
with C in {2, 4, 8, 16}, unstructured as 1x1, or N:M), it is fp32, it is a Linear or a 1x1 stride-1 unpadded Conv2d, and its
sparsity reaches the measured crossover for its shape (crossover.py); otherwise it stays dense in
XNNPACK, and its plan says why.
"""

from __future__ import annotations

import torch
from torch import nn

from edgesparse.recipe import Pattern
from edgesparse.runtime_kernels import crossover, ops  # noqa: F401  (ops defines torch.ops.edgesparse.*)
from edgesparse.runtime_kernels.formats import BCSR, pack_bcsr, pack_nm, pack_qs8_bcsr, quantize_weight

BLOCK_SHAPES = {(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8), (1, 16)}


def _hold_bcsr(module: nn.Module, packed: BCSR, bias: torch.Tensor | None, **extra: torch.Tensor) -> None:
    """The packed weights, `extra` tensors and bias as buffers (they travel into the .pte / .onnx),
    and the shape. The bias, maybe None, comes last: torch.export miscounts buffers after a None one."""
    buffers = {"values": packed.values, "col_idx": packed.col_idx, "row_ptr": packed.row_ptr, **extra,
               "bias": None if bias is None else bias.detach().float().clone()}
    for name, tensor in buffers.items():
        module.register_buffer(name, tensor)
    module.block_rows, module.block_cols = packed.block_rows, packed.block_cols
    module.in_features, module.out_features = packed.in_features, packed.out_features


class _SparseModule(nn.Module):
    """Calls `op` in torch / ExecuTorch and emits `ai.edgesparse::<onnx_op>` under torch.onnx, with
    the tensors named in `operands` and the integer attributes named in `attrs`."""

    op = op_name = onnx_op = None
    operands: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    conv = False

    def output_shape(self, x):
        if self.conv:
            return (x.shape[0], self.out_features, x.shape[2], x.shape[3])
        return (*x.shape[:-1], self.out_features)

    def forward(self, x):
        tensors = tuple(getattr(self, name) for name in self.operands)
        attrs = {name: getattr(self, name) for name in self.attrs}
        if torch.onnx.is_in_onnx_export():  # an ai.edgesparse node, run by the ONNX Runtime op library
            return torch.onnx.ops.symbolic(f"ai.edgesparse::{self.onnx_op}", (x, *tensors), attrs,
                                           dtype=x.dtype, shape=self.output_shape(x), version=1)
        return self.op(x, *tensors, *attrs.values())


class _BCSRModule(_SparseModule):
    operands = ("values", "col_idx", "row_ptr", "bias")
    attrs = ("block_rows", "block_cols", "in_features", "out_features")

    def __init__(self, weight2d: torch.Tensor, bias: torch.Tensor | None, block_rows: int, block_cols: int = 1):
        super().__init__()
        _hold_bcsr(self, pack_bcsr(weight2d, block_rows, block_cols), bias)

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::{self.op_name} ({self.block_rows}x{self.block_cols}, f32)"


class SparseLinear(_BCSRModule):
    op, op_name, onnx_op = torch.ops.edgesparse.bcsr_linear, "bcsr_linear", "BcsrLinear"


class SparseConv1x1(_BCSRModule):
    op, op_name, onnx_op, conv = torch.ops.edgesparse.bcsr_conv1x1, "bcsr_conv1x1", "BcsrConv1x1", True


class _NMModule(_SparseModule):
    operands = ("values", "idx", "bias")
    attrs = ("n", "m", "in_features", "out_features")

    def __init__(self, weight2d: torch.Tensor, bias: torch.Tensor | None, n: int, m: int):
        super().__init__()
        packed = pack_nm(weight2d, n, m)
        self.register_buffer("values", packed.values)
        self.register_buffer("idx", packed.idx)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.n, self.m, self.in_features, self.out_features = n, m, packed.in_features, packed.out_features

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::{self.op_name} ({self.n}:{self.m}, f32)"


class NMLinear(_NMModule):
    op, op_name, onnx_op = torch.ops.edgesparse.nm_linear, "nm_linear", "NmLinear"


class NMConv1x1(_NMModule):
    op, op_name, onnx_op, conv = torch.ops.edgesparse.nm_conv1x1, "nm_conv1x1", "NmConv1x1", True


class QSparseLinear(_SparseModule):
    """A pruned Linear as int8 BCSR Rx1 (per-output-channel symmetric weight scales, per-row
    dynamic int8 activations, int32 sums), run by edgesparse::qs8_bcsr_linear (ONNX: QBcsrLinear)."""

    op, op_name, onnx_op = torch.ops.edgesparse.qs8_bcsr_linear, "qs8_bcsr_linear", "QBcsrLinear"
    operands = ("values", "col_idx", "row_ptr", "scales", "bias")
    attrs = ("block_rows", "in_features", "out_features")

    def __init__(self, weight2d: torch.Tensor, bias: torch.Tensor | None, block_rows: int):
        super().__init__()
        packed, scales = pack_qs8_bcsr(weight2d, block_rows)
        _hold_bcsr(self, packed, bias, scales=scales)

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::{self.op_name} ({self.block_rows}x1, int8)"


class ActSparseLinear(_SparseModule):
    """A Linear whose inputs with |x| <= threshold are skipped (TEAL / CATS activation sparsity),
    run by edgesparse::actsparse_linear. threshold=0 is exact and skips the zeros a ReLU makes;
    a larger threshold trades accuracy for speed (issue 5 calibrates it per layer)."""

    op, op_name, onnx_op = torch.ops.edgesparse.actsparse_linear, "actsparse_linear", "ActSparseLinear"
    operands, attrs = ("weight_t", "bias"), ("threshold",)
    kernel_name = "edgesparse::actsparse_linear (f32)"

    def __init__(self, linear: nn.Linear, threshold: float = 0.0):
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.threshold = float(threshold)
        self.in_features, self.out_features = linear.in_features, linear.out_features


def _check_gated_mlp(gate: nn.Linear, up: nn.Linear, down: nn.Linear, threshold, activation: str) -> bool:
    """The gated-MLP modules' argument checks; True when `threshold` holds one value per neuron."""
    if activation not in ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ops.ACTIVATIONS)} (got {activation!r})")
    if not (gate.weight.shape == up.weight.shape and down.in_features == up.out_features):
        raise ValueError("gate and up must be [hidden, in] and down [out, hidden]")
    per_neuron = isinstance(threshold, torch.Tensor) and threshold.numel() > 1
    if per_neuron and threshold.numel() != gate.out_features:
        raise ValueError(f"per-neuron thresholds must have {gate.out_features} values (got {threshold.numel()})")
    return per_neuron


class ActSparseGatedMLP(_SparseModule):
    """A gated MLP `down(act(gate(x)) * up(x))` (LLaMA / SmolLM2 SwiGLU with act = SiLU) whose
    neurons with |act(gate x)| <= threshold are skipped (CATS; a [hidden] tensor gives one
    threshold per neuron: CHESS), run by edgesparse::actsparse_gated_mlp. The gate runs dense (input-major `[in, hidden]`: one GEMV); each neuron's up row and down column are
    stored together (`bundle`), so a live neuron's weights are one contiguous read and a dead
    one's are never touched. threshold < 0 keeps every neuron (the dense MLP)."""

    op, op_name, onnx_op = torch.ops.edgesparse.actsparse_gated_mlp, "actsparse_gated_mlp", "ActSparseGatedMLP"
    operands = ("gate", "bundle", "gate_bias", "up_bias", "down_bias", "thresholds")
    attrs = ("threshold", "activation")
    kernel_name = "edgesparse::actsparse_gated_mlp (f32)"

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, threshold: float | torch.Tensor = 0.0,
                 activation: str = "silu"):
        super().__init__()

        def bias(linear):
            return None if linear.bias is None else linear.bias.detach().float().clone()

        per_neuron = _check_gated_mlp(gate, up, down, threshold, activation)
        # tensors first, None buffers last: torch.export miscounts buffers after a None one
        self.register_buffer("gate", gate.weight.detach().float().t().contiguous())  # [in, hidden]: the gate is a GEMV
        self.register_buffer("bundle", torch.cat([up.weight.detach().float(), down.weight.detach().float().t()], dim=1).contiguous())
        optional = {"gate_bias": bias(gate), "up_bias": bias(up), "down_bias": bias(down),
                    "thresholds": threshold.detach().float().reshape(-1).clone() if per_neuron else None}
        for name, value in sorted(optional.items(), key=lambda item: item[1] is None):
            self.register_buffer(name, value)
        self.threshold = 0.0 if per_neuron else float(threshold)
        self.activation = ops.ACTIVATIONS[activation]
        self.in_features, self.out_features = gate.in_features, down.out_features



class QActSparseLinear(_SparseModule):
    """ActSparseLinear on int8 weights: weight_t int8 [in, out] with per-output-channel symmetric
    scales, run by edgesparse::qs8_actsparse_linear. dynamic=False multiplies fp32 inputs by the
    int8 rows; dynamic=True quantizes each input row to int8 and sums in integers."""

    op, op_name, onnx_op = torch.ops.edgesparse.qs8_actsparse_linear, "qs8_actsparse_linear", "QActSparseLinear"
    operands, attrs = ("weight_t", "scales", "bias"), ("threshold", "dynamic")

    def __init__(self, linear: nn.Linear, threshold: float = 0.0, dynamic: bool = False):
        super().__init__()
        q, scales = quantize_weight(linear.weight)
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.threshold, self.dynamic = float(threshold), int(bool(dynamic))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def kernel_name(self) -> str:
        return f"edgesparse::qs8_actsparse_linear (int8 weights, {'int8' if self.dynamic else 'fp32'} activations)"


class QActSparseGatedMLP(_SparseModule):
    """ActSparseGatedMLP on int8 weights (per-channel symmetric: gate and up per neuron, down per
    output), fp32 activations, run by edgesparse::qs8_actsparse_gated_mlp: the gate is an
    input-major int8 GEMV, a live neuron reads its int8 up row and down column, a dead one
    nothing past its gate column. threshold < 0 keeps every neuron."""

    op, op_name, onnx_op = torch.ops.edgesparse.qs8_actsparse_gated_mlp, "qs8_actsparse_gated_mlp", "QActSparseGatedMLP"
    operands = ("gate_t", "bundle", "scales", "biases", "thresholds")
    attrs = ("threshold", "activation")
    kernel_name = "edgesparse::qs8_actsparse_gated_mlp (int8 weights)"

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, threshold: float | torch.Tensor = 0.0,
                 activation: str = "silu"):
        super().__init__()
        per_neuron = _check_gated_mlp(gate, up, down, threshold, activation)
        (gq, gs), (uq, us), (dq, ds) = (quantize_weight(m.weight) for m in (gate, up, down))
        self.register_buffer("gate_t", gq.t().contiguous())
        self.register_buffer("bundle", torch.cat([uq, dq.t()], dim=1).contiguous())
        self.register_buffer("scales", torch.cat([gs, us, ds]).contiguous())
        biases = None
        if any(m.bias is not None for m in (gate, up, down)):
            biases = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                                for m in (gate, up, down)])
        optional = {"biases": biases, "thresholds": threshold.detach().float().reshape(-1).clone() if per_neuron else None}
        for name, value in sorted(optional.items(), key=lambda item: item[1] is None):  # None buffers last
            self.register_buffer(name, value)
        self.threshold = 0.0 if per_neuron else float(threshold)
        self.activation = ops.ACTIVATIONS[activation]
        self.in_features, self.out_features = gate.in_features, down.out_features


def onnx_emitter(op, shape: tuple):
    """A function that takes `op`'s arguments (x, operands..., attributes...) and emits the
    ai.edgesparse node the op's module emits under torch.onnx (for graphs already captured)."""
    module = next(cls for cls in _all_subclasses(_SparseModule) if cls.op is not None and cls.op.default == op._overloadpacket.default)

    def emit(x, *rest):
        tensors, values = rest[: len(module.operands)], rest[len(module.operands):]
        return torch.onnx.ops.symbolic(f"ai.edgesparse::{module.onnx_op}", (x, *tensors), dict(zip(module.attrs, values)),
                                       dtype=x.dtype, shape=shape, version=1)

    return emit


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def block_shape_for(pattern: Pattern) -> tuple[int, int] | None:
    """The BCSR block (R, C) a pattern packs into, or None when BCSR has no kernel for it."""
    if pattern.kind == "unstructured":
        return (1, 1)
    if pattern.kind == "block" and (pattern.rows, pattern.cols) in BLOCK_SHAPES:
        return (pattern.rows, pattern.cols)
    return None


def sparse_module(op: str, pattern: Pattern, weight2d: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """The fp32 sparse module for a Linear ("linear") or 1x1 conv ("conv1x1") pruned to `pattern`,
    or None if no kernel runs that pattern (or this shape: 1xC needs in % C == 0, N:M in % M == 0)."""
    if pattern.kind == "nm":
        if pattern.m > 255 or weight2d.shape[1] % pattern.m:
            return None
        return (NMLinear if op == "linear" else NMConv1x1)(weight2d, bias, pattern.n, pattern.m)
    shape = block_shape_for(pattern)
    if shape is None or weight2d.shape[1] % shape[1]:
        return None
    return (SparseLinear if op == "linear" else SparseConv1x1)(weight2d, bias, *shape)


def _op_of(module: nn.Module, plan) -> str | None:
    """"linear" or "conv1x1" when our kernels compute what this layer does: judged by its
    observed behaviour when export saw it run (plan.computes), else by its attributes."""
    if plan.computes is not None:
        return plan.computes if plan.computes in ("linear", "conv1x1") else None
    if isinstance(module, nn.Linear):
        return "linear"
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1):
        return "conv1x1"
    return None


def _beats_dense(op: str, plan, weight: torch.Tensor, dtype: str = "float32") -> bool:
    """Whether the layer's sparsity reaches the crossover measured for its shape against dense
    XNNPACK of the same dtype; the plan's reason says which way and why."""
    threshold, source = crossover.min_sparsity(op, plan.pattern, plan.activation_rows, weight.shape[1], weight.shape[0], dtype)
    dense = "dense XNNPACK" + (" int8" if dtype == "int8" else "")
    if threshold is None or plan.sparsity + 1e-6 < threshold:  # a 70% target pruned to 69.99999%: 70%
        plan.reason = (f"{dense} was faster at every measured sparsity ({source})" if threshold is None
                       else f"{dense}: below the {threshold:.0%} sparsity where the sparse kernel wins ({source})")
        return False
    plan.reason = f"sparse from {threshold:.0%} ({source})"
    return True


def swap_factory(module: nn.Module, plan) -> nn.Module | None:
    op = _op_of(module, plan)
    if op is None:
        plan.reason = ("dense XNNPACK: our kernels run Linear layers and stride-1 unpadded 1x1 convs"
                       + (", and this layer's forward computes something else" if plan.computes == "other" else ""))
        return None
    weight = module.weight.reshape(module.weight.shape[0], -1)
    if not _beats_dense(op, plan, weight):
        return None
    replacement = sparse_module(op, Pattern.parse(plan.pattern), weight, module.bias)
    if replacement is None:
        plan.reason = f"no sparse kernel runs {plan.pattern} on a {weight.shape[0]}x{weight.shape[1]} weight"
    return replacement


def swap_factory_int8(module: nn.Module, plan) -> nn.Module | None:
    """int8-dynamic exports (swapped before quantization): a pruned Linear pruned to Rx1 blocks
    (or unstructured, as 1x1) on edgesparse::qs8_bcsr_linear when its sparsity reaches the crossover
    measured against dense XNNPACK int8; everything else stays for XNNPACK's int8 kernels."""
    op = _op_of(module, plan)
    shape = block_shape_for(Pattern.parse(plan.pattern))
    if op != "linear":
        plan.reason = "dense XNNPACK int8: our int8 sparse kernel runs Linear layers" + (
            " (1x1 convs: fp32 only)" if op == "conv1x1" else "")
        return None
    if shape is None or shape[1] != 1:
        plan.reason = f"dense XNNPACK int8: our int8 sparse kernel runs Rx1 blocks (block:1x1/2x1/4x1/8x1, unstructured), not {plan.pattern}"
        return None
    weight = module.weight.reshape(module.weight.shape[0], -1)
    return QSparseLinear(weight, module.bias, shape[0]) if _beats_dense(op, plan, weight, "int8") else None


def register(register_kernel) -> None:
    """Our factories, into the exporter's registry: fp32 for every pattern kind with a kernel, int8
    (int8-dynamic exports) for the block and unstructured kinds."""
    for kind in ("block", "unstructured", "nm"):
        register_kernel(kind, "float32", "edgesparse-sparse", swap_factory, builtin=True)
    for kind in ("block", "unstructured"):
        register_kernel(kind, "int8", "edgesparse-sparse-int8", swap_factory_int8, builtin=True)
