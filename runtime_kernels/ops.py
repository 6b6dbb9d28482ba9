"""The edgesparse:: op schemas for torch: what torch.export captures and ExecuTorch runs.

Each op has the functional form, the `.out` form ExecuTorch's emitter looks up, an eager
implementation (dense reconstruction: slow, for debugging and as the reference) and a Meta
implementation (shapes only, for export). The ExecuTorch kernels are in et_ops/et_ops.cpp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgesparse.runtime_kernels.formats import quantize_rows, unpack_bcsr

_ARGS = "Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor? bias, int block_rows, int in_features, int out_features"
_lib = torch.library.Library("edgesparse", "DEF")
for _name in ("bcsr_linear", "bcsr_conv1x1"):
    _lib.define(f"{_name}({_ARGS}) -> Tensor")
    _lib.define(f"{_name}.out({_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def _linear(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features):
    return F.linear(x, unpack_bcsr(values, col_idx, row_ptr, block_rows, in_features, out_features), bias)


def _conv1x1(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features):
    weight = unpack_bcsr(values, col_idx, row_ptr, block_rows, in_features, out_features)
    return F.conv2d(x, weight[:, :, None, None], bias)


def _linear_meta(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _conv1x1_meta(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features):
    return x.new_empty((x.shape[0], out_features, x.shape[2], x.shape[3]))


def _out_variant(fn):
    def impl(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features, *, out):
        result = fn(x, values, col_idx, row_ptr, bias, block_rows, in_features, out_features)
        out.resize_(result.shape).copy_(result)
        return out
    return impl


# Activation-sparse linear (TEAL / CATS): weight_t is [in, out]; inputs with |x| <= threshold
# contribute nothing. The eager version is the reference: mask, then a dense matmul.
_AS_ARGS = "Tensor x, Tensor weight_t, Tensor? bias, float threshold"
_lib.define(f"actsparse_linear({_AS_ARGS}) -> Tensor")
_lib.define(f"actsparse_linear.out({_AS_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def _actsparse(x, weight_t, bias, threshold):
    y = torch.where(x.abs() > threshold, x, torch.zeros_like(x)) @ weight_t
    return y if bias is None else y + bias


def _actsparse_out(x, weight_t, bias, threshold, *, out):
    result = _actsparse(x, weight_t, bias, threshold)
    out.resize_(result.shape).copy_(result)
    return out


_lib.impl("actsparse_linear", _actsparse, "CompositeExplicitAutograd")
_lib.impl("actsparse_linear.out", _actsparse_out, "CompositeExplicitAutograd")
_lib.impl("actsparse_linear", lambda x, weight_t, bias, threshold: x.new_empty((*x.shape[:-1], weight_t.shape[1])), "Meta")

# int8 BCSR linear: int8 values with per-output-channel scales, activations quantized per row
# inside the op (dynamic). The eager version is the integer reference: exact int sums in float64.
_Q_ARGS = ("Tensor x, Tensor values, Tensor col_idx, Tensor row_ptr, Tensor scales, Tensor? bias, "
           "int block_rows, int in_features, int out_features")
_lib.define(f"qs8_bcsr_linear({_Q_ARGS}) -> Tensor")
_lib.define(f"qs8_bcsr_linear.out({_Q_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def _qs8_linear(x, values, col_idx, row_ptr, scales, bias, block_rows, in_features, out_features):
    xq, x_scale = quantize_rows(x.float())
    w_int = unpack_bcsr(values.double(), col_idx, row_ptr, block_rows, in_features, out_features)
    acc = (xq.double() @ w_int.t()).float()
    y = acc * (scales * x_scale)
    return y if bias is None else y + bias


def _qs8_linear_out(x, values, col_idx, row_ptr, scales, bias, block_rows, in_features, out_features, *, out):
    result = _qs8_linear(x, values, col_idx, row_ptr, scales, bias, block_rows, in_features, out_features)
    out.resize_(result.shape).copy_(result)
    return out


_lib.impl("qs8_bcsr_linear", _qs8_linear, "CompositeExplicitAutograd")
_lib.impl("qs8_bcsr_linear.out", _qs8_linear_out, "CompositeExplicitAutograd")
_lib.impl("qs8_bcsr_linear", lambda x, *args: x.new_empty((*x.shape[:-1], args[-1])), "Meta")

for _name, _eager, _meta in (("bcsr_linear", _linear, _linear_meta), ("bcsr_conv1x1", _conv1x1, _conv1x1_meta)):
    _lib.impl(_name, _eager, "CompositeExplicitAutograd")
    _lib.impl(f"{_name}.out", _out_variant(_eager), "CompositeExplicitAutograd")
    _lib.impl(_name, _meta, "Meta")
