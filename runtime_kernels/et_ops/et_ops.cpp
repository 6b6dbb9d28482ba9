// ExecuTorch kernels for the edgesparse:: custom ops: thin wrappers that check shapes and hand raw
// pointers to the C kernels. Registered once, when this library is loaded (static initializer).
// The op schemas (and the eager/Meta implementations torch.export needs) live in
// edgesparse/runtime_kernels/ops.py; the argument order here must match them.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <vector>

#include "edgesparse/kernels.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// BCSR operands: `values` of the given dtype (Float, or Char for int8), int32 indices, a row_ptr
// with one entry per row block plus one, and an optional float bias [out_features].
bool check_weights(KernelRuntimeContext& ctx, const Tensor& values, const Tensor& col_idx, const Tensor& row_ptr,
                   const std::optional<Tensor>& bias, int64_t block_rows, int64_t out_features,
                   ScalarType values_type = ScalarType::Float) {
  const bool ok = values.scalar_type() == values_type && col_idx.scalar_type() == ScalarType::Int &&
                  row_ptr.scalar_type() == ScalarType::Int && block_rows >= 1 &&
                  row_ptr.numel() == (out_features + block_rows - 1) / block_rows + 1 &&
                  (!bias.has_value() || (bias->scalar_type() == ScalarType::Float && bias->numel() == out_features));
  if (!ok) {
    ET_LOG(Error, "edgesparse: malformed BCSR weights or bias");
    ctx.fail(Error::InvalidArgument);
  }
  return ok;
}

// out = x's shape with the last dimension replaced by `last` (every linear-like op here).
bool resize_last_dim(KernelRuntimeContext& ctx, const Tensor& x, int64_t last, Tensor& out) {
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  if (x.dim() < 1 || x.dim() > static_cast<ssize_t>(executorch::runtime::kTensorDimensionLimit)) {
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  for (ssize_t d = 0; d < x.dim(); d++) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<SizesType>(last);
  if (executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  return true;
}

// Split the row blocks across ExecuTorch's thread pool (the one XNNPACK uses, sized by
// _unsafe_reset_threadpool / the app): chunks of at least ~16k multiply-adds, one chunk when small.
template <typename Kernel>
void for_row_blocks(size_t out_features, size_t block_rows, const int32_t* row_ptr, size_t rows_per_block_call,
                    Kernel kernel) {
  const int64_t blocks = static_cast<int64_t>((out_features + block_rows - 1) / block_rows);
  const int64_t work = static_cast<int64_t>(row_ptr[blocks]) * static_cast<int64_t>(block_rows * rows_per_block_call);
  const int64_t grain = work <= 0 ? blocks : std::max<int64_t>(1, blocks * 16384 / work);
  executorch::extension::parallel_for(0, blocks, std::max<int64_t>(grain, 1), [&](int64_t b0, int64_t b1) {
    kernel(static_cast<size_t>(b0), static_cast<size_t>(b1));
  });
}

es_bcsr_f32 describe(const Tensor& values, const Tensor& col_idx, const Tensor& row_ptr,
                     const std::optional<Tensor>& bias, int64_t block_rows, int64_t in_features, int64_t out_features) {
  return es_bcsr_f32{static_cast<size_t>(out_features), static_cast<size_t>(in_features),
                     static_cast<size_t>(block_rows), values.const_data_ptr<float>(),
                     col_idx.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(),
                     bias.has_value() ? bias->const_data_ptr<float>() : nullptr};
}

// y[..., out] = W x[..., in] + bias
Tensor& bcsr_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                        const Tensor& row_ptr, const std::optional<Tensor>& bias, int64_t block_rows,
                        int64_t in_features, int64_t out_features, Tensor& out) {
  if (!check_weights(ctx, values, col_idx, row_ptr, bias, block_rows, out_features)) return out;
  if (x.scalar_type() != ScalarType::Float || x.dim() < 1 || x.size(x.dim() - 1) != in_features) {
    ET_LOG(Error, "edgesparse::bcsr_linear: input must be float with last dim %lld", (long long)in_features);
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resize_last_dim(ctx, x, out_features, out)) return out;
  const es_bcsr_f32 w = describe(values, col_idx, row_ptr, bias, block_rows, in_features, out_features);
  const size_t rows = static_cast<size_t>(x.numel() / in_features);
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  for_row_blocks(w.out, w.block_rows, w.row_ptr, rows, [&](size_t b0, size_t b1) { es_f32_bcsr_linear_blocks(&w, rows, xp, yp, b0, b1); });
  return out;
}

// 1x1 convolution, NCHW: x [N, in, H, W] -> out [N, out, H, W]
Tensor& bcsr_conv1x1_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                         const Tensor& row_ptr, const std::optional<Tensor>& bias, int64_t block_rows,
                         int64_t in_features, int64_t out_features, Tensor& out) {
  if (!check_weights(ctx, values, col_idx, row_ptr, bias, block_rows, out_features)) return out;
  if (x.scalar_type() != ScalarType::Float || x.dim() != 4 || x.size(1) != in_features) {
    ET_LOG(Error, "edgesparse::bcsr_conv1x1: input must be float NCHW with %lld channels", (long long)in_features);
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  SizesType sizes[4] = {static_cast<SizesType>(x.size(0)), static_cast<SizesType>(out_features),
                        static_cast<SizesType>(x.size(2)), static_cast<SizesType>(x.size(3))};
  if (executorch::runtime::resize_tensor(out, {sizes, 4}) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  const es_bcsr_f32 w = describe(values, col_idx, row_ptr, bias, block_rows, in_features, out_features);
  const size_t pixels = static_cast<size_t>(x.size(2) * x.size(3));
  for (ssize_t n = 0; n < x.size(0); n++) {
    const float* xp = x.const_data_ptr<float>() + n * in_features * pixels;
    float* yp = out.mutable_data_ptr<float>() + n * out_features * pixels;
    for_row_blocks(w.out, w.block_rows, w.row_ptr, pixels, [&](size_t b0, size_t b1) { es_f32_bcsr_conv1x1_nchw_blocks(&w, pixels, xp, yp, b0, b1); });
  }
  return out;
}

// Activation-sparse linear: x [..., in], weight_t [in, out]; threads split the output columns.
Tensor& actsparse_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight_t,
                             const std::optional<Tensor>& bias, double threshold, Tensor& out) {
  const bool ok = x.scalar_type() == ScalarType::Float && weight_t.scalar_type() == ScalarType::Float &&
                  weight_t.dim() == 2 && x.dim() >= 1 && x.size(x.dim() - 1) == weight_t.size(0) &&
                  (!bias.has_value() || (bias->scalar_type() == ScalarType::Float && bias->numel() == weight_t.size(1)));
  if (!ok) {
    ET_LOG(Error, "edgesparse::actsparse_linear: float x [..., in], weight_t [in, out], bias [out] expected");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resize_last_dim(ctx, x, weight_t.size(1), out)) return out;
  const es_actsparse_f32 w{static_cast<size_t>(weight_t.size(1)), static_cast<size_t>(weight_t.size(0)),
                           weight_t.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr};
  const size_t rows = static_cast<size_t>(x.numel() / weight_t.size(0));
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  // column chunks of 256 outputs (whole cache lines), at least ~64k multiply-adds each
  const int64_t chunks = static_cast<int64_t>((w.out + 255) / 256);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(65536 / (256 * w.in * rows + 1)));
  executorch::extension::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    es_f32_actsparse_linear_cols(&w, static_cast<float>(threshold), rows, xp, yp, static_cast<size_t>(c0) * 256,
                                 std::min(w.out, static_cast<size_t>(c1) * 256));
  });
  return out;
}

// int8 BCSR linear: x [..., in] float, quantized per row here; threads split the row blocks.
Tensor& qs8_bcsr_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                            const Tensor& row_ptr, const Tensor& scales, const std::optional<Tensor>& bias,
                            int64_t block_rows, int64_t in_features, int64_t out_features, Tensor& out) {
  if (!check_weights(ctx, values, col_idx, row_ptr, bias, block_rows, out_features, ScalarType::Char)) return out;
  if (scales.scalar_type() != ScalarType::Float || scales.numel() != out_features || x.scalar_type() != ScalarType::Float ||
      x.dim() < 1 || x.size(x.dim() - 1) != in_features) {
    ET_LOG(Error, "edgesparse::qs8_bcsr_linear: scales must be float [out], input float with last dim %lld",
           (long long)in_features);
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resize_last_dim(ctx, x, out_features, out)) return out;
  const es_bcsr_qs8 w{static_cast<size_t>(out_features), static_cast<size_t>(in_features),
                      static_cast<size_t>(block_rows), values.const_data_ptr<int8_t>(),
                      col_idx.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(),
                      scales.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr};
  const size_t rows = static_cast<size_t>(x.numel() / in_features);
  thread_local std::vector<int8_t> xq;  // grows to the largest input seen, then is reused
  thread_local std::vector<float> x_scale;
  xq.resize(rows * w.in);
  x_scale.resize(rows);
  es_qs8_quantize_rows(rows, w.in, x.const_data_ptr<float>(), xq.data(), x_scale.data());
  // plain pointers: inside the pool's threads the names xq / x_scale would be their own copies
  const int8_t* xqp = xq.data();
  const float* xsp = x_scale.data();
  float* yp = out.mutable_data_ptr<float>();
  for_row_blocks(w.out, w.block_rows, w.row_ptr, rows,
                 [&](size_t b0, size_t b1) { es_qs8_bcsr_linear_blocks(&w, rows, xqp, xsp, yp, nullptr, b0, b1); });
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgesparse, "bcsr_linear.out", bcsr_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "bcsr_conv1x1.out", bcsr_conv1x1_out);
EXECUTORCH_LIBRARY(edgesparse, "actsparse_linear.out", actsparse_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_bcsr_linear.out", qs8_bcsr_linear_out);
