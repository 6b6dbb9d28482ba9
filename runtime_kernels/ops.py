"""The edgesparse:: op schemas for torch: what torch.export captures and ExecuTorch runs.

Each op has the functional form, the `.out` form ExecuTorch's emitter looks up, an eager
implementation (dense reconstruction: slow, for debugging and as the reference) and a Meta
implementation (shapes only, for export). The ExecuTorch kernels are in et_ops/et_ops.cpp; the
argument order there must match these schemas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgesparse.runtime_kernels.formats import quantize_rows, ungroup_qs8, unpack_bcsr, unpack_nm

_lib = torch.library.Library("edgesparse", "DEF")


def _define(name: str, args: str, eager, out_features, shape=None) -> None:
    """Schema, `.out` variant, eager and Meta implementations of one op. `out_features(x, *args)`
    gives the output's last dimension (linear-like ops) or channels (NCHW convs, name *_conv1x1);
    `shape(x, *args)`, when given, the whole output shape instead."""
    _lib.define(f"{name}({args}) -> Tensor")
    _lib.define(f"{name}.out({args}, *, Tensor(a!) out) -> Tensor(a!)")

    def out_variant(*a, out):
        result = eager(*a)
        out.resize_(result.shape).copy_(result)
        return out

    def meta(x, *a):
        if shape is not None:
            return x.new_empty(shape(x, *a))
        if name.endswith("conv1x1"):
            return x.new_empty((x.shape[0], out_features(x, *a), x.shape[2], x.shape[3]))
        return x.new_empty((*x.shape[:-1], out_features(x, *a)))

    _lib.impl(name, eager, "CompositeExplicitAutograd")
    _lib.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    _lib.impl(name, meta, "Meta")


def _conv(x, weight, bias):
    return F.conv2d(x, weight[:, :, None, None], bias)


# BCSR RxC (formats.py): linear and 1x1 conv (NCHW).
_BCSR = ("Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor? bias, int block_rows, int block_cols, "
         "int in_features, int out_features")


def _bcsr_weight(values, col_idx, row_ptr, block_rows, block_cols, in_features, out_features):
    return unpack_bcsr(values, col_idx, row_ptr, block_rows, in_features, out_features, block_cols)


_define("bcsr_linear", _BCSR, lambda x, v, c, r, bias, *shape: F.linear(x, _bcsr_weight(v, c, r, *shape), bias),
        lambda x, *a: a[-1])
_define("bcsr_conv1x1", _BCSR, lambda x, v, c, r, bias, *shape: _conv(x, _bcsr_weight(v, c, r, *shape), bias),
        lambda x, *a: a[-1])

# N:M (formats.py): float values and uint8 positions [out, in / m * n].
_NM = "Tensor x, Tensor values, Tensor idx, Tensor? bias, int n, int m, int in_features, int out_features"
_define("nm_linear", _NM, lambda x, v, i, bias, *shape: F.linear(x, unpack_nm(v, i, *shape), bias), lambda x, *a: a[-1])
_define("nm_conv1x1", _NM, lambda x, v, i, bias, *shape: _conv(x, unpack_nm(v, i, *shape), bias), lambda x, *a: a[-1])


# Activation-sparse linear (TEAL / CATS): weight_t is [in, out]; inputs with |x| <= threshold
# contribute nothing. The eager version is the reference: mask, then a dense matmul.
def _actsparse(x, weight_t, bias, threshold):
    y = torch.where(x.abs() > threshold, x, torch.zeros_like(x)) @ weight_t
    return y if bias is None else y + bias


_define("actsparse_linear", "Tensor x, Tensor weight_t, Tensor? bias, float threshold", _actsparse,
        lambda x, weight_t, *a: weight_t.shape[1])

ACTIVATIONS = {"silu": 0, "relu": 1}  # the C kernels' ES_ACT_* codes


# Activation-sparse gated MLP (CATS on SwiGLU): gate [in, hidden] dense (input-major); bundle [hidden, in + out]
# holds each neuron's up row and down column; neurons with |act(gate x)| <= threshold are skipped
# (one threshold per neuron when `thresholds` [hidden] is given: CHESS).
def _gated_mlp(x, gate, bundle, gate_bias, up_bias, down_bias, thresholds, threshold, activation):
    inp = gate.shape[0]
    g = x @ gate if gate_bias is None else x @ gate + gate_bias
    a = torch.relu(g) if activation == ACTIVATIONS["relu"] else F.silu(g)
    limit = threshold if thresholds is None else thresholds
    h = torch.where(a.abs() > limit, a * F.linear(x, bundle[:, :inp], up_bias), torch.zeros_like(a))
    y = h @ bundle[:, inp:]
    return y if down_bias is None else y + down_bias


_define("actsparse_gated_mlp", "Tensor x, Tensor gate, Tensor bundle, Tensor? gate_bias, Tensor? up_bias, "
        "Tensor? down_bias, Tensor? thresholds, float threshold, int activation", _gated_mlp,
        lambda x, gate, bundle, *a: bundle.shape[1] - gate.shape[0])


# int8 BCSR Rx1 linear: int8 values (grouped by four blocks, formats.pack_qs8_bcsr) with
# per-output-channel scales, activations quantized per row inside the op (dynamic). The eager
# version is the integer reference: exact int sums in float64.
def _qs8_linear(x, values, col_idx, row_ptr, scales, bias, block_rows, in_features, out_features):
    xq, x_scale = quantize_rows(x.float())
    w_int = unpack_bcsr(ungroup_qs8(values.double(), block_rows), col_idx, row_ptr, block_rows, in_features, out_features)
    acc = (xq.double() @ w_int.t()).float()
    y = acc * (scales * x_scale)
    return y if bias is None else y + bias


_define("qs8_bcsr_linear", "Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor scales, Tensor? bias, "
        "int block_rows, int in_features, int out_features", _qs8_linear, lambda x, *a: a[-1])


def _dw_shape(x, stride):
    """A depthwise 3x3 conv's output shape (padding 1): es_dwconv3x3_out_size per side."""
    return (x.shape[0], x.shape[1], (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1)


def _requantize(v, y_zp, y_min, y_max):
    """es_qs8_store: fp32 values -> int8 (clamp, round half to even, + zero point)."""
    return (torch.round(v.clamp(y_min - y_zp, y_max - y_zp)) + y_zp).to(torch.int8)


# Static int8 1x1 conv on quantized NCHW tensors (es_qs8_bcsr_conv1x1_nchw, XNNPACK's QS8 conv
# semantics): x int8, int8 BCSR Rx1 weights, bias int32 [out] (the input's zero point folded in:
# int32 bias - x_zp * row sums), mult [out] = x_scale * weight_scale / y_scale (fp32); the output
# int8, clamped to [y_min, y_max] (a fused ReLU / ReLU6). The eager version is the integer
# reference: exact sums in float64, then the fp32 multiply and round half to even of the kernels.
def _qs8_conv(x, values, col_idx, row_ptr, mult, bias, block_rows, in_features, out_features, y_zp, y_min, y_max):
    w_int = unpack_bcsr(ungroup_qs8(values.double(), block_rows), col_idx, row_ptr, block_rows, in_features, out_features)
    acc = torch.einsum("oc,nchw->nohw", w_int, x.double())
    if bias is not None:
        acc = acc + bias.double()[None, :, None, None]
    return _requantize(acc.float() * mult[None, :, None, None], y_zp, y_min, y_max)


_define("qs8_bcsr_conv1x1", "Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor mult, Tensor? bias, "
        "int block_rows, int in_features, int out_features, int y_zp, int y_min, int y_max", _qs8_conv,
        lambda x, *a: a[-4])


# The static int8 layers between our 1x1 convs (src/qs8-chain), NCHW, int8 in and out: a depthwise
# 3x3 (padding 1 with the input zero point, stride 1 or 2; weight int8 [C, 1, 3, 3], mult and int32
# bias per channel) and an add of two int8 tensors. Eager: the integer reference.
def _qs8_dwconv(x, weight, mult, bias, stride, x_zp, y_zp, y_min, y_max):
    acc = F.conv2d(x.double() - x_zp, weight.double(), None if bias is None else bias.double(), stride=stride, padding=1,
                   groups=x.shape[1])
    return _requantize(acc.float() * mult[None, :, None, None], y_zp, y_min, y_max)


def _qs8_add(a, b, a_mult, b_mult, a_zp, b_zp, y_zp, y_min, y_max):
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  (the kernels' fp32 multipliers)
    return _requantize((a.float() - a_zp) * f32(a_mult) + (b.float() - b_zp) * f32(b_mult), y_zp, y_min, y_max)


_define("qs8_dwconv3x3", "Tensor x, Tensor weight, Tensor mult, Tensor? bias, int stride, int x_zp, int y_zp, int y_min, "
        "int y_max", _qs8_dwconv, None,
        shape=lambda x, w, m, b, stride, *a: _dw_shape(x, stride))
_define("qs8_add", "Tensor a, Tensor b, float a_mult, float b_mult, int a_zp, int b_zp, int y_zp, int y_min, int y_max",
        _qs8_add, None, shape=lambda a, *rest: a.shape)


# Activation sparsity on int8 weights (src/qs8-actsparse): weight_t int8 [in, out] with
# per-output-channel scales; inputs with |x| <= threshold are skipped. dynamic=0: fp32 x times the
# int8 rows (fp32 sums); dynamic=1: x quantized per row inside the op (quantize_rows) and summed
# in integers: the eager version is the integer reference (exact sums in float64).
def _qs8_actsparse(x, weight_t, scales, bias, threshold, dynamic):
    live = x.abs() > threshold
    if dynamic:
        xq, x_scale = quantize_rows(x.float())
        y = ((xq * live).double() @ weight_t.double()).float() * (scales * x_scale)
    else:
        y = (torch.where(live, x, torch.zeros_like(x)) @ weight_t.float()) * scales
    return y if bias is None else y + bias


_define("qs8_actsparse_linear", "Tensor x, Tensor weight_t, Tensor scales, Tensor? bias, float threshold, int dynamic",
        _qs8_actsparse, lambda x, weight_t, *a: weight_t.shape[1])


# The gated MLP (CATS / CHESS) on int8 weights, fp32 activations: gate_t int8 [in, hidden] (an
# input-major GEMV), bundle int8 [hidden, in + out] (up row | down column per neuron); scales
# [2 * hidden + out] = gate (per neuron) | up (per neuron) | down (per output); biases, when
# present, in the same three parts (zeros for a linear without one).
def _qs8_gated_mlp(x, gate_t, bundle, scales, biases, thresholds, threshold, activation):
    inp, hidden = gate_t.shape
    g = (x @ gate_t.float()) * scales[:hidden]
    u = (x @ bundle[:, :inp].float().t()) * scales[hidden:2 * hidden]
    if biases is not None:
        g, u = g + biases[:hidden], u + biases[hidden:2 * hidden]
    a = torch.relu(g) if activation == ACTIVATIONS["relu"] else F.silu(g)
    limit = threshold if thresholds is None else thresholds
    h = torch.where(a.abs() > limit, a * u, torch.zeros_like(a))
    y = (h @ bundle[:, inp:].float()) * scales[2 * hidden:]
    return y if biases is None else y + biases[2 * hidden:]


_define("qs8_actsparse_gated_mlp", "Tensor x, Tensor gate_t, Tensor bundle, Tensor scales, Tensor? biases, "
        "Tensor? thresholds, float threshold, int activation", _qs8_gated_mlp,
        lambda x, gate_t, bundle, *a: bundle.shape[1] - gate_t.shape[0])


# Fused chains (fusion.py rewrites exported graphs to these, so a chain of layers stays on our
# kernels in NCHW instead of entering XNNPACK between them). `min` / `max` are the activation's
# clamp; NO_CLAMP (float32's largest value, finite so every serializer takes it) means none.
NO_CLAMP = 3.4028234663852886e38


def _clamp(y, lo, hi):
    return y if lo <= -NO_CLAMP and hi >= NO_CLAMP else y.clamp(lo, hi)


# 1x1 conv (BCSR, NCHW) + bias + residual, then the clamp: y = clamp(W x + b + residual, min, max)
def _bcsr_conv1x1_fused(x, v, c, r, bias, residual, block_rows, block_cols, in_features, out_features, lo, hi):
    y = _conv(x, _bcsr_weight(v, c, r, block_rows, block_cols, in_features, out_features), bias)
    return _clamp(y if residual is None else y + residual, lo, hi)


_define("bcsr_conv1x1_fused", "Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor? bias, Tensor? residual, "
        "int block_rows, int block_cols, int in_features, int out_features, float min, float max", _bcsr_conv1x1_fused,
        None, shape=lambda x, *a: (x.shape[0], a[-3], x.shape[2], x.shape[3]))


# Depthwise 3x3 conv (NCHW), padding 1, stride 1 or 2, bias, then the clamp. weight [C, 1, 3, 3].
def _dwconv3x3(x, weight, bias, stride, lo, hi):
    return _clamp(F.conv2d(x, weight, bias, stride, 1, 1, weight.shape[0]), lo, hi)


_define("dwconv3x3", "Tensor x, Tensor weight, Tensor? bias, int stride, float min, float max", _dwconv3x3, None,
        shape=lambda x, weight, bias, stride, *a: _dw_shape(x, stride))
