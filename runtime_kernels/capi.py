"""ctypes binding of the plain C ABI (include/edgesparse/kernels.h), for tests and benchmarks."""

from __future__ import annotations

import ctypes

import torch

from edgesparse.runtime_kernels import C_LIBRARY
from edgesparse.runtime_kernels.formats import BCSR, NM

_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)


class _Weights(ctypes.Structure):
    _fields_ = [("out", ctypes.c_size_t), ("in_", ctypes.c_size_t), ("block_rows", ctypes.c_size_t),
                ("block_cols", ctypes.c_size_t), ("values", _f32p), ("col_idx", _i32p), ("row_ptr", _i32p),
                ("bias", _f32p)]


class _NM(ctypes.Structure):
    _fields_ = [("out", ctypes.c_size_t), ("in_", ctypes.c_size_t), ("n", ctypes.c_size_t), ("m", ctypes.c_size_t),
                ("values", _f32p), ("idx", ctypes.POINTER(ctypes.c_uint8)), ("bias", _f32p)]


class _ActSparse(ctypes.Structure):
    _fields_ = [("out", ctypes.c_size_t), ("in_", ctypes.c_size_t), ("weight_t", _f32p), ("bias", _f32p),
                ("stride", ctypes.c_size_t)]  # 0: rows of `out` floats


_lib = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(C_LIBRARY))
        _lib.es_f32_bcsr_isa.restype = ctypes.c_char_p
        _lib.es_force_isa.argtypes = [ctypes.c_char_p]
    return _lib


def _ptr(t: torch.Tensor, kind):
    return ctypes.cast(t.data_ptr(), kind)


def weights(packed: BCSR | NM, bias: torch.Tensor | None):
    bias_ptr = _ptr(bias, _f32p) if bias is not None else None
    if isinstance(packed, NM):
        return _NM(packed.out_features, packed.in_features, packed.n, packed.m, _ptr(packed.values, _f32p),
                   ctypes.cast(packed.idx.data_ptr(), ctypes.POINTER(ctypes.c_uint8)), bias_ptr)
    return _Weights(packed.out_features, packed.in_features, packed.block_rows, packed.block_cols,
                    _ptr(packed.values, _f32p), _ptr(packed.col_idx, _i32p), _ptr(packed.row_ptr, _i32p), bias_ptr)


def _family(packed: BCSR | NM) -> str:
    return "es_f32_nm" if isinstance(packed, NM) else "es_f32_bcsr"


def linear(packed: BCSR | NM, bias, x: torch.Tensor) -> torch.Tensor:
    """x [n, in] -> y [n, out] (BCSR or N:M weights)"""
    x = x.contiguous().float()
    y = torch.empty(*x.shape[:-1], packed.out_features)
    w = weights(packed, bias)
    getattr(lib(), f"{_family(packed)}_linear")(ctypes.byref(w), ctypes.c_size_t(x.numel() // packed.in_features),
                                                 _ptr(x, _f32p), _ptr(y, _f32p))
    return y


def conv1x1_nchw(packed: BCSR | NM, bias, x: torch.Tensor) -> torch.Tensor:
    """x [in, pixels] -> y [out, pixels]"""
    x = x.contiguous().float()
    y = torch.empty(packed.out_features, x.shape[1])
    w = weights(packed, bias)
    getattr(lib(), f"{_family(packed)}_conv1x1_nchw")(ctypes.byref(w), ctypes.c_size_t(x.shape[1]), _ptr(x, _f32p),
                                                       _ptr(y, _f32p))
    return y


def actsparse_linear(weight_t: torch.Tensor, bias, threshold: float, x: torch.Tensor) -> torch.Tensor:
    """x [n, in], weight_t [in, out] -> y [n, out], skipping inputs with |x| <= threshold"""
    x, weight_t = x.contiguous().float(), weight_t.contiguous().float()
    y = torch.empty(x.shape[0], weight_t.shape[1])
    w = _ActSparse(weight_t.shape[1], weight_t.shape[0], _ptr(weight_t, _f32p), _ptr(bias, _f32p) if bias is not None else None)
    lib().es_f32_actsparse_linear(ctypes.byref(w), ctypes.c_float(threshold), ctypes.c_size_t(x.shape[0]),
                                  _ptr(x, _f32p), _ptr(y, _f32p))
    return y


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """es_qs8_quantize_rows on x [n, in]: (int8 [n, in], float32 scales [n])"""
    x = x.contiguous().float()
    xq = torch.empty(x.shape, dtype=torch.int8)
    scales = torch.empty(x.shape[0])
    lib().es_qs8_quantize_rows(ctypes.c_size_t(x.shape[0]), ctypes.c_size_t(x.shape[1]), _ptr(x, _f32p),
                               ctypes.cast(xq.data_ptr(), ctypes.POINTER(ctypes.c_int8)), _ptr(scales, _f32p))
    return xq, scales


def isa() -> str:
    return lib().es_f32_bcsr_isa().decode()


def force_isa(name: str | None) -> bool:
    return lib().es_force_isa(name.encode() if name else None) == 0


# ---- activation sparsity on int8 weights (src/qs8-actsparse) ----
_i8p = ctypes.POINTER(ctypes.c_int8)


class _ActSparseQc8w(ctypes.Structure):
    _fields_ = [("out", ctypes.c_size_t), ("in_", ctypes.c_size_t), ("weight_t", _i8p), ("scales", _f32p),
                ("bias", _f32p), ("stride", ctypes.c_size_t)]


class _GatedQc8w(ctypes.Structure):
    _fields_ = [("in_", ctypes.c_size_t), ("hidden", ctypes.c_size_t), ("out", ctypes.c_size_t), ("gate_t", _i8p),
                ("gate_scales", _f32p), ("bundle", _i8p), ("up_scales", _f32p), ("down_scales", _f32p),
                ("gate_bias", _f32p), ("up_bias", _f32p), ("down_bias", _f32p), ("act", ctypes.c_int),
                ("thresholds", _f32p)]


def _opt(t, kind=_f32p):
    return _ptr(t, kind) if t is not None else None


def qs8_actsparse_linear(weight_t: torch.Tensor, scales, bias, threshold: float, x: torch.Tensor,
                         dynamic: bool) -> torch.Tensor:
    """x [n, in], int8 weight_t [in, out], scales [out] -> y [n, out]: fp32 x times int8 rows
    (es_f32_qc8w_actsparse_linear_cols) or, dynamic, x quantized per row (es_qs8_actsparse_linear_cols)"""
    x = x.contiguous().float()
    y = torch.empty(x.shape[0], weight_t.shape[1])
    w = _ActSparseQc8w(weight_t.shape[1], weight_t.shape[0], _ptr(weight_t, _i8p), _ptr(scales, _f32p), _opt(bias), 0)
    n = ctypes.c_size_t(x.shape[0])
    if dynamic:
        xq, x_scale = quantize_rows(x)
        lib().es_qs8_actsparse_linear_cols(ctypes.byref(w), ctypes.c_float(threshold), n, _ptr(x, _f32p),
                                           _ptr(xq, _i8p), _ptr(x_scale, _f32p), _ptr(y, _f32p), ctypes.c_size_t(0),
                                           ctypes.c_size_t(w.out))
    else:
        lib().es_f32_qc8w_actsparse_linear_cols(ctypes.byref(w), ctypes.c_float(threshold), n, _ptr(x, _f32p),
                                                _ptr(y, _f32p), ctypes.c_size_t(0), ctypes.c_size_t(w.out))
    return y


def qs8_gated_mlp(gate_t, bundle, scales, biases, thresholds, threshold: float, activation: int,
                  x: torch.Tensor) -> torch.Tensor:
    """es_f32_qc8w_gated_mlp with QActSparseGatedMLP's buffers (scales / biases [2 hidden + out])"""
    x = x.contiguous().float()
    inp, hidden = gate_t.shape
    out = bundle.shape[1] - inp
    y, h = torch.empty(x.shape[0], out), torch.empty(x.shape[0], hidden)
    sp = scales.data_ptr()
    fp = lambda addr: ctypes.cast(addr, _f32p)  # noqa: E731
    bp = biases.data_ptr() if biases is not None else None
    w = _GatedQc8w(inp, hidden, out, _ptr(gate_t, _i8p), fp(sp), _ptr(bundle, _i8p), fp(sp + 4 * hidden),
                   fp(sp + 8 * hidden), fp(bp) if bp else None, fp(bp + 4 * hidden) if bp else None,
                   fp(bp + 8 * hidden) if bp else None, activation, _opt(thresholds))
    lib().es_f32_qc8w_gated_mlp(ctypes.byref(w), ctypes.c_float(threshold), ctypes.c_size_t(x.shape[0]),
                                _ptr(x, _f32p), _ptr(h, _f32p), _ptr(y, _f32p))
    return y
