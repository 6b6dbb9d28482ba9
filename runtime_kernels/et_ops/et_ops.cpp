// ExecuTorch kernels for the edgesparse:: custom ops: thin wrappers that check shapes and hand raw
// pointers to the C kernels. Registered once, when this library is loaded (static initializer).
// The op schemas (and the eager/Meta implementations torch.export needs) live in
// edgesparse/runtime_kernels/ops.py; the argument order here must match them.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <vector>

#include "edgesparse/et_threadpool.h"
#include "edgesparse/kernels.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

bool fail(KernelRuntimeContext& ctx, const char* op, const char* why) {
  ET_LOG(Error, "edgesparse::%s: %s", op, why);
  ctx.fail(Error::InvalidArgument);
  return false;
}

bool optional_float(const std::optional<Tensor>& t, int64_t numel) {
  return !t.has_value() || (t->scalar_type() == ScalarType::Float && t->numel() == numel);
}

const float* data_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->const_data_ptr<float>() : nullptr; }

// BCSR operands: `values` of the given dtype (Float, or Char for int8), int32 indices whose sizes
// agree (es_bcsr_check), an optional float bias [out_features], and x [..., in] (or NCHW) float.
bool check_weights(KernelRuntimeContext& ctx, const char* op, const Tensor& values, const Tensor& col_idx,
                   const Tensor& row_ptr, const std::optional<Tensor>& bias, int64_t block_rows, int64_t block_cols,
                   int64_t in_features, int64_t out_features, ScalarType values_type = ScalarType::Float) {
  if (values.scalar_type() != values_type || col_idx.scalar_type() != ScalarType::Int ||
      row_ptr.scalar_type() != ScalarType::Int || block_rows < 1 || block_cols < 1 || in_features < 1 ||
      out_features < 1 || row_ptr.numel() < 1)
    return fail(ctx, op, "malformed BCSR weights (values, int32 col_idx / row_ptr, positive sizes)");
  if (const char* why = es_bcsr_check(out_features, in_features, block_rows, block_cols,
                                      row_ptr.const_data_ptr<int32_t>(), row_ptr.numel(), col_idx.numel(), values.numel()))
    return fail(ctx, op, why);
  if (!optional_float(bias, out_features)) return fail(ctx, op, "bias must be float [out_features]");
  return true;
}

bool check_input(KernelRuntimeContext& ctx, const char* op, const Tensor& x, int64_t in_features, bool nchw) {
  const bool ok = x.scalar_type() == ScalarType::Float &&
                  (nchw ? x.dim() == 4 && x.size(1) == in_features : x.dim() >= 1 && x.size(x.dim() - 1) == in_features);
  return ok || fail(ctx, op, nchw ? "input must be float NCHW with in_features channels"
                                  : "input must be float with last dim in_features");
}

// out = [N, out_features, H, W] for x [N, in, H, W]
bool resize_nchw(KernelRuntimeContext& ctx, const Tensor& x, int64_t out_features, Tensor& out) {
  SizesType sizes[4] = {static_cast<SizesType>(x.size(0)), static_cast<SizesType>(out_features),
                        static_cast<SizesType>(x.size(2)), static_cast<SizesType>(x.size(3))};
  if (executorch::runtime::resize_tensor(out, {sizes, 4}) == Error::Ok) return true;
  ctx.fail(Error::InvalidArgument);
  return false;
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

// ---- threads ----------------------------------------------------------------------------------
// Our ops run on ExecuTorch's thread pool, the one XNNPACK uses (sized by the app, the runner's
// --threads, or _unsafe_reset_threadpool). A call is cut into pieces of equal work, whole output
// row blocks (or outputs, or column chunks) each, so every output is computed by the same code
// whatever the thread count: results are bit-identical across thread counts. Cutting by work (the
// nonzeros in row_ptr), not by row count, matters: a pruned layer's rows differ a lot in nonzeros,
// and equal row counts left one thread idle while the other finished. A call below
// kMinMacsPerThread multiply-adds per thread runs on the calling thread alone: waking the pool
// costs more than such a call gains from it.
constexpr int64_t kMinMacsPerThread = int64_t{1} << 17;
// spare pieces per thread: a thread the OS runs late loses its unstarted pieces to the others
constexpr int64_t kPiecesPerThread = 4;

// How many pieces to cut `units` (row blocks, outputs, column chunks) doing `work` multiply-adds into.
int64_t pieces_for(int64_t units, int64_t work) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  const int64_t threads = pool ? static_cast<int64_t>(pool->get_thread_count()) : 1;
  if (threads < 2 || work < 2 * kMinMacsPerThread) return 1;
  return std::max<int64_t>(1, std::min({units, work / kMinMacsPerThread, threads * kPiecesPerThread}));
}

// kernel(u0, u1) over [0, units), cut into pieces of equal cost; cost_before(u) is the cost of
// units [0, u) (non-decreasing, cost_before(units) the whole call's multiply-adds).
template <typename Cost, typename Kernel>
void for_balanced(int64_t units, Cost cost_before, Kernel kernel) {
  const int64_t total = cost_before(units);
  const int64_t n = pieces_for(units, total);
  if (n <= 1) {
    kernel(size_t{0}, static_cast<size_t>(units));
    return;
  }
  std::vector<size_t> bounds(static_cast<size_t>(n) + 1, static_cast<size_t>(units));
  bounds[0] = 0;
  for (int64_t i = 1; i < n; i++) {  // the first unit at or past i/n of the cost
    const int64_t target = total / n * i + total % n * i / n;
    int64_t lo = static_cast<int64_t>(bounds[i - 1]), hi = units;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost_before(mid) < target) lo = mid + 1;
      else hi = mid;
    }
    bounds[i] = static_cast<size_t>(lo);
  }
  executorch::extension::threadpool::get_threadpool()->run(
      [&](size_t i) {
        if (bounds[i] < bounds[i + 1]) kernel(bounds[i], bounds[i + 1]);
      },
      static_cast<size_t>(n));
}

// Units of equal cost: `work` multiply-adds over `units`.
template <typename Kernel>
void for_uniform(int64_t units, int64_t work, Kernel kernel) {
  const int64_t per_unit = units > 0 ? std::max<int64_t>(1, work / units) : 1;
  for_balanced(units, [per_unit](int64_t u) { return u * per_unit; }, kernel);
}

// The row blocks of a BCSR weight run over `rows` input rows (or pixels): each block costs its
// nonzeros times the rows, plus one (the bias and the store of its outputs).
template <typename Kernel>
void for_row_blocks(int64_t blocks, const int32_t* row_ptr, int64_t macs_per_nonzero, Kernel kernel) {
  for_balanced(blocks, [=](int64_t b) { return (static_cast<int64_t>(row_ptr[b]) + b) * macs_per_nonzero; }, kernel);
}

es_bcsr_f32 describe(const Tensor& values, const Tensor& col_idx, const Tensor& row_ptr,
                     const std::optional<Tensor>& bias, int64_t block_rows, int64_t block_cols, int64_t in_features,
                     int64_t out_features) {
  return es_bcsr_f32{static_cast<size_t>(out_features), static_cast<size_t>(in_features),
                     static_cast<size_t>(block_rows), static_cast<size_t>(block_cols), values.const_data_ptr<float>(),
                     col_idx.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(),
                     data_or_null(bias)};
}

// the row blocks of w, and the multiply-adds of one nonzero block over `rows` input rows (or pixels)
int64_t row_blocks(const es_bcsr_f32& w) { return static_cast<int64_t>(es_bcsr_row_blocks(&w)); }
int64_t bcsr_macs(const es_bcsr_f32& w, size_t rows) { return static_cast<int64_t>(w.block_rows * w.block_cols * rows); }

// y[..., out] = W x[..., in] + bias
Tensor& bcsr_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                        const Tensor& row_ptr, const std::optional<Tensor>& bias, int64_t block_rows,
                        int64_t block_cols, int64_t in_features, int64_t out_features, Tensor& out) {
  if (!check_weights(ctx, "bcsr_linear", values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features) ||
      !check_input(ctx, "bcsr_linear", x, in_features, false) || !resize_last_dim(ctx, x, out_features, out))
    return out;
  const es_bcsr_f32 w = describe(values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features);
  const size_t rows = static_cast<size_t>(x.numel() / in_features);
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  for_row_blocks(row_blocks(w), w.row_ptr, bcsr_macs(w, rows),
                 [&](size_t b0, size_t b1) { es_f32_bcsr_linear_blocks(&w, rows, xp, yp, b0, b1); });
  return out;
}

// 1x1 convolution, NCHW: x [N, in, H, W] -> out [N, out, H, W]
Tensor& bcsr_conv1x1_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                         const Tensor& row_ptr, const std::optional<Tensor>& bias, int64_t block_rows,
                         int64_t block_cols, int64_t in_features, int64_t out_features, Tensor& out) {
  if (!check_weights(ctx, "bcsr_conv1x1", values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features) ||
      !check_input(ctx, "bcsr_conv1x1", x, in_features, true) || !resize_nchw(ctx, x, out_features, out))
    return out;
  const es_bcsr_f32 w = describe(values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features);
  const size_t pixels = static_cast<size_t>(x.size(2) * x.size(3));
  for (ssize_t n = 0; n < x.size(0); n++) {
    const float* xp = x.const_data_ptr<float>() + n * in_features * pixels;
    float* yp = out.mutable_data_ptr<float>() + n * out_features * pixels;
    for_row_blocks(row_blocks(w), w.row_ptr, bcsr_macs(w, pixels),
                   [&](size_t b0, size_t b1) { es_f32_bcsr_conv1x1_nchw_blocks(&w, pixels, xp, yp, b0, b1); });
  }
  return out;
}

// 1x1 convolution, NCHW, with its consumers fused: out = clamp(W x + bias + residual, min, max)
// (residual optional, [N, out, H, W]); threads split the row blocks as in bcsr_conv1x1.
Tensor& bcsr_conv1x1_fused_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                               const Tensor& row_ptr, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& residual, int64_t block_rows, int64_t block_cols,
                               int64_t in_features, int64_t out_features, double min, double max, Tensor& out) {
  const char* op = "bcsr_conv1x1_fused";
  if (!check_weights(ctx, op, values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features) ||
      !check_input(ctx, op, x, in_features, true))
    return out;
  if (residual.has_value() &&
      (residual->scalar_type() != ScalarType::Float || residual->dim() != 4 || residual->size(0) != x.size(0) ||
       residual->size(1) != out_features || residual->size(2) != x.size(2) || residual->size(3) != x.size(3))) {
    fail(ctx, op, "residual must be float [N, out_features, H, W]");
    return out;
  }
  if (!resize_nchw(ctx, x, out_features, out)) return out;
  const es_bcsr_f32 w = describe(values, col_idx, row_ptr, bias, block_rows, block_cols, in_features, out_features);
  const size_t pixels = static_cast<size_t>(x.size(2) * x.size(3));
  for (ssize_t n = 0; n < x.size(0); n++) {
    const float* xp = x.const_data_ptr<float>() + n * in_features * pixels;
    float* yp = out.mutable_data_ptr<float>() + n * out_features * pixels;
    const es_epilogue_f32 e{residual.has_value() ? residual->const_data_ptr<float>() + n * out_features * pixels : nullptr,
                            static_cast<float>(min), static_cast<float>(max)};
    for_row_blocks(row_blocks(w), w.row_ptr, bcsr_macs(w, pixels),
                   [&](size_t b0, size_t b1) { es_f32_bcsr_conv1x1_nchw_fused_blocks(&w, &e, pixels, xp, yp, b0, b1); });
  }
  return out;
}

// A depthwise 3x3 conv's output (x [N, C, H, W] -> out [N, C, oh, ow] at `stride`), then
// kernel(x image, out image, h, w, scratch, c0, c1) over each image's channels, split across the
// pool; each pool thread keeps its own scratch of scratch_size(h, w, stride) elements (grown to the
// largest plane seen).
template <typename T, typename S, typename Kernel>
void for_dw3x3_images(KernelRuntimeContext& ctx, const Tensor& x, size_t stride, size_t (*scratch_size)(size_t, size_t, size_t),
                      Tensor& out, Kernel kernel) {
  const size_t h = static_cast<size_t>(x.size(2)), wd = static_cast<size_t>(x.size(3));
  const size_t scratch_count = scratch_size(h, wd, stride);
  const size_t oh = es_dwconv3x3_out_size(h, stride), ow = es_dwconv3x3_out_size(wd, stride);
  SizesType sizes[4] = {static_cast<SizesType>(x.size(0)), static_cast<SizesType>(x.size(1)),
                        static_cast<SizesType>(oh), static_cast<SizesType>(ow)};
  if (executorch::runtime::resize_tensor(out, {sizes, 4}) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const size_t channels = static_cast<size_t>(x.size(1));
  for (ssize_t n = 0; n < x.size(0); n++) {
    const T* xp = x.const_data_ptr<T>() + n * channels * h * wd;
    T* yp = out.mutable_data_ptr<T>() + n * channels * oh * ow;
    for_uniform(static_cast<int64_t>(channels), static_cast<int64_t>(9 * oh * ow * channels), [&](size_t c0, size_t c1) {
      thread_local std::vector<S> scratch;
      if (scratch.size() < scratch_count) scratch.resize(scratch_count);
      kernel(xp, yp, h, wd, scratch.data(), c0, c1);
    });
  }
}

// Depthwise 3x3 convolution, NCHW, padding 1, stride 1 or 2, bias and clamp fused; weight
// [C, 1, 3, 3]. Threads split the channels; each uses its own scratch plane.
Tensor& dwconv3x3_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                      int64_t stride, double min, double max, Tensor& out) {
  const bool ok = x.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float && x.dim() == 4 &&
                  weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3 && optional_float(bias, x.size(1)) && (stride == 1 || stride == 2) &&
                  x.size(2) > 0 && x.size(3) > 0;
  if (!ok) {
    fail(ctx, "dwconv3x3", "float x [N, C, H, W], weight [C, 1, 3, 3], bias [C], stride 1 or 2 expected");
    return out;
  }
  const size_t s = static_cast<size_t>(stride);
  const es_dwconv3x3_f32 w{static_cast<size_t>(x.size(1)), s, weight.const_data_ptr<float>(), data_or_null(bias),
                           static_cast<float>(min), static_cast<float>(max)};
  for_dw3x3_images<float, float>(ctx, x, s, es_f32_dwconv3x3_scratch, out,
                                 [&](const float* xp, float* yp, size_t h, size_t wd, float* scratch, size_t c0, size_t c1) {
                                   es_f32_dwconv3x3_nchw_channels(&w, h, wd, xp, yp, scratch, c0, c1);
                                 });
  return out;
}

// N:M operands: float values and uint8 positions [out, in / m * n], optional float bias [out].
bool check_nm(KernelRuntimeContext& ctx, const char* op, const Tensor& values, const Tensor& idx,
              const std::optional<Tensor>& bias, int64_t n, int64_t m, int64_t in_features, int64_t out_features) {
  if (values.scalar_type() != ScalarType::Float || idx.scalar_type() != ScalarType::Byte || n < 1 || m < 1 ||
      in_features < 1 || out_features < 1)
    return fail(ctx, op, "malformed N:M weights (float values, uint8 idx, positive sizes)");
  if (const char* why = es_nm_check(out_features, in_features, n, m, values.numel(), idx.numel())) return fail(ctx, op, why);
  if (!optional_float(bias, out_features)) return fail(ctx, op, "bias must be float [out_features]");
  return true;
}

es_nm_f32 describe_nm(const Tensor& values, const Tensor& idx, const std::optional<Tensor>& bias, int64_t n, int64_t m,
                      int64_t in_features, int64_t out_features) {
  return es_nm_f32{static_cast<size_t>(out_features), static_cast<size_t>(in_features), static_cast<size_t>(n),
                   static_cast<size_t>(m), values.const_data_ptr<float>(), idx.const_data_ptr<uint8_t>(),
                   data_or_null(bias)};
}

Tensor& nm_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& idx,
                      const std::optional<Tensor>& bias, int64_t n, int64_t m, int64_t in_features,
                      int64_t out_features, Tensor& out) {
  if (!check_nm(ctx, "nm_linear", values, idx, bias, n, m, in_features, out_features) ||
      !check_input(ctx, "nm_linear", x, in_features, false) || !resize_last_dim(ctx, x, out_features, out))
    return out;
  const es_nm_f32 w = describe_nm(values, idx, bias, n, m, in_features, out_features);
  const size_t rows = static_cast<size_t>(x.numel() / in_features);
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  for_uniform(out_features, values.numel() * static_cast<int64_t>(rows),
              [&](size_t o0, size_t o1) { es_f32_nm_linear_outs(&w, rows, xp, yp, o0, o1); });
  return out;
}

Tensor& nm_conv1x1_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& idx,
                       const std::optional<Tensor>& bias, int64_t n, int64_t m, int64_t in_features,
                       int64_t out_features, Tensor& out) {
  if (!check_nm(ctx, "nm_conv1x1", values, idx, bias, n, m, in_features, out_features) ||
      !check_input(ctx, "nm_conv1x1", x, in_features, true) || !resize_nchw(ctx, x, out_features, out))
    return out;
  const es_nm_f32 w = describe_nm(values, idx, bias, n, m, in_features, out_features);
  const size_t pixels = static_cast<size_t>(x.size(2) * x.size(3));
  for (ssize_t i = 0; i < x.size(0); i++) {
    const float* xp = x.const_data_ptr<float>() + i * in_features * pixels;
    float* yp = out.mutable_data_ptr<float>() + i * out_features * pixels;
    for_uniform(out_features, values.numel() * static_cast<int64_t>(pixels),
                [&](size_t o0, size_t o1) { es_f32_nm_conv1x1_nchw_outs(&w, pixels, xp, yp, o0, o1); });
  }
  return out;
}

// Activation-sparse linear: x [..., in], weight_t [in, out]; threads split the output columns.
Tensor& actsparse_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight_t,
                             const std::optional<Tensor>& bias, double threshold, Tensor& out) {
  const bool ok = x.scalar_type() == ScalarType::Float && weight_t.scalar_type() == ScalarType::Float &&
                  weight_t.dim() == 2 && x.dim() >= 1 && x.size(x.dim() - 1) == weight_t.size(0) &&
                  optional_float(bias, weight_t.size(1));
  if (!ok) {
    fail(ctx, "actsparse_linear", "float x [..., in], weight_t [in, out], bias [out] expected");
    return out;
  }
  if (!resize_last_dim(ctx, x, weight_t.size(1), out)) return out;
  const es_actsparse_f32 w{static_cast<size_t>(weight_t.size(1)), static_cast<size_t>(weight_t.size(0)),
                           weight_t.const_data_ptr<float>(), data_or_null(bias), 0};
  const size_t rows = static_cast<size_t>(x.numel() / weight_t.size(0));
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  // column chunks of 256 outputs (whole cache lines)
  const int64_t chunks = static_cast<int64_t>((w.out + 255) / 256);
  for_uniform(chunks, static_cast<int64_t>(w.in * w.out * rows), [&](size_t c0, size_t c1) {
    es_f32_actsparse_linear_cols(&w, static_cast<float>(threshold), rows, xp, yp, c0 * 256, std::min(w.out, c1 * 256));
  });
  return out;
}

// Gated MLP (CATS): x [..., in]; gate [in, hidden]; bundle [hidden, in + out]. Threads split the
// neurons (gate, up: fills h), then the output columns (down).
Tensor& actsparse_gated_mlp_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& gate, const Tensor& bundle,
                                const std::optional<Tensor>& gate_bias, const std::optional<Tensor>& up_bias,
                                const std::optional<Tensor>& down_bias, const std::optional<Tensor>& thresholds,
                                double threshold, int64_t activation, Tensor& out) {
  const bool ok = x.scalar_type() == ScalarType::Float && gate.scalar_type() == ScalarType::Float &&
                  bundle.scalar_type() == ScalarType::Float && gate.dim() == 2 && bundle.dim() == 2 &&
                  bundle.size(0) == gate.size(1) && bundle.size(1) > gate.size(0) && x.dim() >= 1 &&
                  x.size(x.dim() - 1) == gate.size(0) && optional_float(gate_bias, gate.size(1)) &&
                  optional_float(up_bias, gate.size(1)) && optional_float(down_bias, bundle.size(1) - gate.size(0)) &&
                  optional_float(thresholds, gate.size(1)) && (activation == ES_ACT_SILU || activation == ES_ACT_RELU);
  if (!ok) {
    fail(ctx, "actsparse_gated_mlp", "float x [..., in], gate [in, hidden], bundle [hidden, in + out], biases, thresholds [hidden], activation 0/1 expected");
    return out;
  }
  const size_t in = static_cast<size_t>(gate.size(0)), hidden = static_cast<size_t>(gate.size(1));
  const es_gated_mlp_f32 w{in, hidden, static_cast<size_t>(bundle.size(1)) - in, gate.const_data_ptr<float>(),
                           bundle.const_data_ptr<float>(), data_or_null(gate_bias), data_or_null(up_bias),
                           data_or_null(down_bias), static_cast<int>(activation), data_or_null(thresholds)};
  if (!resize_last_dim(ctx, x, static_cast<int64_t>(w.out), out)) return out;
  const size_t rows = static_cast<size_t>(x.numel()) / in;
  thread_local std::vector<float> h;  // grows to the largest call seen, then is reused
  h.resize(rows * hidden);
  float* hp = h.data();
  const float* xp = x.const_data_ptr<float>();
  const float t = static_cast<float>(threshold);
  for_uniform(static_cast<int64_t>(hidden), static_cast<int64_t>(2 * in * hidden * rows),
              [&](size_t i0, size_t i1) { es_f32_gated_mlp_hidden(&w, t, rows, xp, hp, i0, i1); });
  const es_actsparse_f32 down = es_gated_mlp_down(&w);
  float* yp = out.mutable_data_ptr<float>();
  const int64_t chunks = static_cast<int64_t>((w.out + 255) / 256);
  for_uniform(chunks, static_cast<int64_t>(w.hidden * w.out * rows), [&](size_t c0, size_t c1) {
    es_f32_actsparse_linear_cols(&down, 0.0f, rows, hp, yp, c0 * 256, std::min(w.out, c1 * 256));
  });
  return out;
}

// int8 BCSR linear: x [..., in] float, quantized per row here; threads split the row blocks.
Tensor& qs8_bcsr_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                            const Tensor& row_ptr, const Tensor& scales, const std::optional<Tensor>& bias,
                            int64_t block_rows, int64_t in_features, int64_t out_features, Tensor& out) {
  const char* op = "qs8_bcsr_linear";
  if (!check_weights(ctx, op, values, col_idx, row_ptr, bias, block_rows, 1, in_features, out_features, ScalarType::Char) ||
      !check_input(ctx, op, x, in_features, false))
    return out;
  if (scales.scalar_type() != ScalarType::Float || scales.numel() != out_features) {
    fail(ctx, op, "scales must be float [out_features]");
    return out;
  }
  if (const char* why = es_qs8_bcsr_check(out_features, in_features, block_rows, row_ptr.const_data_ptr<int32_t>(),
                                          row_ptr.numel(), col_idx.numel(), values.numel())) {
    fail(ctx, op, why);
    return out;
  }
  if (!resize_last_dim(ctx, x, out_features, out)) return out;
  const es_bcsr_qs8 w{static_cast<size_t>(out_features), static_cast<size_t>(in_features),
                      static_cast<size_t>(block_rows), values.const_data_ptr<int8_t>(),
                      col_idx.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(),
                      scales.const_data_ptr<float>(), data_or_null(bias)};
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
  thread_local std::vector<uint8_t> tiles;  // many rows: transposed once here, shared by every piece
  tiles.resize(es_qs8_tiles_bytes(rows, w.in));
  if (!tiles.empty()) es_qs8_make_tiles(rows, w.in, xqp, tiles.data());
  const uint8_t* tp = tiles.empty() ? nullptr : tiles.data();
  const int64_t blocks = static_cast<int64_t>((w.out + w.block_rows - 1) / w.block_rows);
  for_row_blocks(blocks, w.row_ptr, static_cast<int64_t>(w.block_rows * rows),
                 [&](size_t b0, size_t b1) { es_qs8_bcsr_linear_blocks(&w, rows, xqp, tp, xsp, yp, nullptr, b0, b1); });
  return out;
}

bool optional_int32(const std::optional<Tensor>& t, int64_t numel) {
  return !t.has_value() || (t->scalar_type() == ScalarType::Int && t->numel() == numel);
}

// a static int8 op's requantization (checked: check_out_range; mult float, bias int32 or none)
es_qs8_requant requant(int64_t y_zp, int64_t y_min, int64_t y_max, const Tensor& mult, const std::optional<Tensor>& bias) {
  return es_qs8_requant{static_cast<int32_t>(y_zp), static_cast<int32_t>(y_min), static_cast<int32_t>(y_max),
                        mult.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<int32_t>() : nullptr};
}

// the output range of a static int8 op: int8 values with y_min <= y_zp <= y_max
bool check_out_range(KernelRuntimeContext& ctx, const char* op, int64_t y_zp, int64_t y_min, int64_t y_max) {
  return (y_min >= -128 && y_max <= 127 && y_zp >= y_min && y_zp <= y_max) ||
         fail(ctx, op, "the output zero point and range must be int8 values with y_min <= y_zp <= y_max");
}

// Static int8 1x1 convolution on quantized NCHW tensors: x int8 [N, in, H, W] -> out int8
// [N, out, H, W] (es_qs8_bcsr_conv1x1_nchw: mult float [out], bias int32 [out] with the input's
// zero point folded in); threads split the row blocks.
Tensor& qs8_bcsr_conv1x1_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& values, const Tensor& col_idx,
                             const Tensor& row_ptr, const Tensor& mult, const std::optional<Tensor>& bias,
                             int64_t block_rows, int64_t in_features, int64_t out_features, int64_t y_zp, int64_t y_min,
                             int64_t y_max, Tensor& out) {
  const char* op = "qs8_bcsr_conv1x1";
  if (!check_weights(ctx, op, values, col_idx, row_ptr, std::nullopt, block_rows, 1, in_features, out_features,
                     ScalarType::Char))
    return out;
  if (x.scalar_type() != ScalarType::Char || x.dim() != 4 || x.size(1) != in_features) {
    fail(ctx, op, "input must be int8 NCHW with in_features channels (a quantized tensor: the op takes no float input)");
    return out;
  }
  if (mult.scalar_type() != ScalarType::Float || mult.numel() != out_features || !optional_int32(bias, out_features)) {
    fail(ctx, op, "mult must be float [out_features] and bias int32 [out_features]");
    return out;
  }
  if (!check_out_range(ctx, op, y_zp, y_min, y_max)) return out;
  if (const char* why = es_qs8_bcsr_check(out_features, in_features, block_rows, row_ptr.const_data_ptr<int32_t>(),
                                          row_ptr.numel(), col_idx.numel(), values.numel())) {
    fail(ctx, op, why);
    return out;
  }
  if (!resize_nchw(ctx, x, out_features, out)) return out;
  const es_bcsr_qs8 w{static_cast<size_t>(out_features), static_cast<size_t>(in_features),
                      static_cast<size_t>(block_rows), values.const_data_ptr<int8_t>(),
                      col_idx.const_data_ptr<int32_t>(), row_ptr.const_data_ptr<int32_t>(), nullptr, nullptr};
  const es_qs8_requant q = requant(y_zp, y_min, y_max, mult, bias);
  const size_t pixels = static_cast<size_t>(x.size(2) * x.size(3));
  const int64_t blocks = static_cast<int64_t>((w.out + w.block_rows - 1) / w.block_rows);
  for (ssize_t n = 0; n < x.size(0); n++) {
    const int8_t* xp = x.const_data_ptr<int8_t>() + n * in_features * pixels;
    int8_t* yp = out.mutable_data_ptr<int8_t>() + n * out_features * pixels;
    for_row_blocks(blocks, w.row_ptr, static_cast<int64_t>(w.block_rows * pixels),
                   [&](size_t b0, size_t b1) { es_qs8_bcsr_conv1x1_nchw(&w, &q, pixels, xp, yp, b0, b1); });
  }
  return out;
}

// Static int8 depthwise 3x3 (padding 1 with the input zero point, stride 1 or 2), NCHW: x int8
// [N, C, H, W], weight int8 [C, 1, 3, 3], mult float [C], bias int32 [C]; threads split the channels.
Tensor& qs8_dwconv3x3_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const Tensor& mult,
                          const std::optional<Tensor>& bias, int64_t stride, int64_t x_zp, int64_t y_zp, int64_t y_min,
                          int64_t y_max, Tensor& out) {
  const char* op = "qs8_dwconv3x3";
  const bool ok = x.scalar_type() == ScalarType::Char && weight.scalar_type() == ScalarType::Char && x.dim() == 4 &&
                  weight.numel() == 9 * x.size(1) && mult.scalar_type() == ScalarType::Float &&
                  mult.numel() == x.size(1) && optional_int32(bias, x.size(1)) &&
                  (stride == 1 || stride == 2) && x.size(2) > 0 && x.size(3) > 0 && x_zp >= -128 && x_zp <= 127;
  if (!ok) {
    fail(ctx, op, "int8 x [N, C, H, W], int8 weight [C, 1, 3, 3], float mult [C], int32 bias [C], stride 1 or 2 expected");
    return out;
  }
  if (!check_out_range(ctx, op, y_zp, y_min, y_max)) return out;
  const size_t s = static_cast<size_t>(stride);
  const es_dwconv3x3_qs8 w{static_cast<size_t>(x.size(1)), s, weight.const_data_ptr<int8_t>(), static_cast<int32_t>(x_zp)};
  const es_qs8_requant q = requant(y_zp, y_min, y_max, mult, bias);
  for_dw3x3_images<int8_t, int32_t>(ctx, x, s, es_qs8_dwconv3x3_scratch, out,
                                    [&](const int8_t* xp, int8_t* yp, size_t h, size_t wd, int32_t* scratch, size_t c0,
                                        size_t c1) { es_qs8_dwconv3x3_nchw_channels(&w, &q, h, wd, xp, yp, scratch, c0, c1); });
  return out;
}

// Static int8 add of two int8 tensors of one shape (es_qs8_add); threads split the elements.
Tensor& qs8_add_out(KernelRuntimeContext& ctx, const Tensor& a, const Tensor& b, double a_mult, double b_mult,
                    int64_t a_zp, int64_t b_zp, int64_t y_zp, int64_t y_min, int64_t y_max, Tensor& out) {
  const char* op = "qs8_add";
  if (a.scalar_type() != ScalarType::Char || b.scalar_type() != ScalarType::Char || a.numel() != b.numel() ||
      a.dim() != b.dim() || a_zp < -128 || a_zp > 127 || b_zp < -128 || b_zp > 127) {
    fail(ctx, op, "two int8 tensors of one shape with int8 zero points expected");
    return out;
  }
  for (ssize_t d = 0; d < a.dim(); d++)
    if (a.size(d) != b.size(d)) {
      fail(ctx, op, "two int8 tensors of one shape expected (no broadcasting)");
      return out;
    }
  if (!check_out_range(ctx, op, y_zp, y_min, y_max)) return out;
  if (executorch::runtime::resize_tensor(out, a.sizes()) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  const es_qs8_add_params p{static_cast<int32_t>(a_zp), static_cast<int32_t>(b_zp), static_cast<float>(a_mult),
                            static_cast<float>(b_mult),
                            {static_cast<int32_t>(y_zp), static_cast<int32_t>(y_min), static_cast<int32_t>(y_max), nullptr,
                             nullptr}};
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int8_t* bp = b.const_data_ptr<int8_t>();
  int8_t* yp = out.mutable_data_ptr<int8_t>();
  const int64_t chunks = (a.numel() + 4095) / 4096, n = a.numel();
  for_uniform(chunks, n, [&](size_t c0, size_t c1) {
    const size_t i0 = c0 * 4096, i1 = std::min<size_t>(static_cast<size_t>(n), c1 * 4096);
    es_qs8_add(&p, i1 - i0, ap + i0, bp + i0, yp + i0);
  });
  return out;
}

// ---- activation sparsity on int8 weights (src/qs8-actsparse) ----

// x [..., in] float; weight_t int8 [in, out]; scales float [out]; dynamic 1 quantizes x per row.
// Threads split the output columns in chunks of 256.
Tensor& qs8_actsparse_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight_t,
                                 const Tensor& scales, const std::optional<Tensor>& bias, double threshold,
                                 int64_t dynamic, Tensor& out) {
  const bool ok = x.scalar_type() == ScalarType::Float && weight_t.scalar_type() == ScalarType::Char &&
                  weight_t.dim() == 2 && x.dim() >= 1 && x.size(x.dim() - 1) == weight_t.size(0) &&
                  scales.scalar_type() == ScalarType::Float && scales.numel() == weight_t.size(1) &&
                  optional_float(bias, weight_t.size(1)) && (dynamic == 0 || dynamic == 1);
  if (!ok) {
    fail(ctx, "qs8_actsparse_linear", "float x [..., in], int8 weight_t [in, out], float scales [out], bias [out], dynamic 0/1 expected");
    return out;
  }
  if (!resize_last_dim(ctx, x, weight_t.size(1), out)) return out;
  const es_actsparse_qc8w w{static_cast<size_t>(weight_t.size(1)), static_cast<size_t>(weight_t.size(0)),
                            weight_t.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(), data_or_null(bias), 0};
  const size_t rows = static_cast<size_t>(x.numel() / weight_t.size(0));
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  thread_local std::vector<int8_t> xq;  // grows to the largest input seen, then is reused
  thread_local std::vector<float> x_scale;
  const int8_t* xqp = nullptr;
  const float* xsp = nullptr;
  if (dynamic) {
    xq.resize(rows * w.in);
    x_scale.resize(rows);
    es_qs8_quantize_rows(rows, w.in, xp, xq.data(), x_scale.data());
    xqp = xq.data();  // plain pointers: inside the pool's threads the thread_locals are other copies
    xsp = x_scale.data();
  }
  const int64_t chunks = static_cast<int64_t>((w.out + 255) / 256);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(65536 / (256 * w.in * rows + 1)));
  executorch::extension::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const size_t o0 = static_cast<size_t>(c0) * 256, o1 = std::min(w.out, static_cast<size_t>(c1) * 256);
    if (xqp)
      es_qs8_actsparse_linear_cols(&w, static_cast<float>(threshold), rows, xp, xqp, xsp, yp, o0, o1);
    else
      es_f32_qc8w_actsparse_linear_cols(&w, static_cast<float>(threshold), rows, xp, yp, o0, o1);
  });
  return out;
}

// Gated MLP on int8 weights: x [..., in]; gate_t int8 [in, hidden]; bundle int8 [hidden, in + out];
// scales [2 * hidden + out]; biases (same layout) and per-neuron thresholds optional. Threads
// split the neurons in tiles of 64 (the GEMV's register tile), then the output columns.
Tensor& qs8_actsparse_gated_mlp_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& gate_t,
                                    const Tensor& bundle, const Tensor& scales, const std::optional<Tensor>& biases,
                                    const std::optional<Tensor>& thresholds, double threshold, int64_t activation,
                                    Tensor& out) {
  const bool shapes = gate_t.dim() == 2 && bundle.dim() == 2 && bundle.size(0) == gate_t.size(1) &&
                      bundle.size(1) > gate_t.size(0) && x.dim() >= 1 && x.size(x.dim() - 1) == gate_t.size(0);
  const int64_t parts = shapes ? 2 * gate_t.size(1) + bundle.size(1) - gate_t.size(0) : -1;
  const bool ok = shapes && x.scalar_type() == ScalarType::Float && gate_t.scalar_type() == ScalarType::Char &&
                  bundle.scalar_type() == ScalarType::Char && scales.scalar_type() == ScalarType::Float &&
                  scales.numel() == parts && optional_float(biases, parts) && optional_float(thresholds, gate_t.size(1)) &&
                  (activation == ES_ACT_SILU || activation == ES_ACT_RELU);
  if (!ok) {
    fail(ctx, "qs8_actsparse_gated_mlp", "float x [..., in], int8 gate_t [in, hidden], int8 bundle [hidden, in + out], scales / biases [2 hidden + out], thresholds [hidden], activation 0/1 expected");
    return out;
  }
  const size_t in = static_cast<size_t>(gate_t.size(0)), hidden = static_cast<size_t>(gate_t.size(1));
  const size_t outs = static_cast<size_t>(bundle.size(1)) - in;
  const float* sp = scales.const_data_ptr<float>();
  const float* bp = data_or_null(biases);
  const es_gated_mlp_qc8w w{in, hidden, outs, gate_t.const_data_ptr<int8_t>(), sp, bundle.const_data_ptr<int8_t>(),
                            sp + hidden, sp + 2 * hidden, bp, bp ? bp + hidden : nullptr, bp ? bp + 2 * hidden : nullptr,
                            static_cast<int>(activation), data_or_null(thresholds)};
  if (!resize_last_dim(ctx, x, static_cast<int64_t>(outs), out)) return out;
  const size_t rows = static_cast<size_t>(x.numel()) / in;
  thread_local std::vector<float> h;  // grows to the largest call seen, then is reused
  h.resize(rows * hidden);
  float* hp = h.data();
  const float* xp = x.const_data_ptr<float>();
  const float t = static_cast<float>(threshold);
  const int64_t tiles = static_cast<int64_t>((hidden + 63) / 64);
  executorch::extension::parallel_for(0, tiles, std::max<int64_t>(1, 32768 / (128 * in * rows + 1)), [&](int64_t a, int64_t b) {
    es_f32_qc8w_gated_mlp_hidden(&w, t, rows, xp, hp, static_cast<size_t>(a) * 64, std::min(hidden, static_cast<size_t>(b) * 64));
  });
  const es_actsparse_qc8w down = es_gated_mlp_qc8w_down(&w);
  float* yp = out.mutable_data_ptr<float>();
  const int64_t chunks = static_cast<int64_t>((outs + 255) / 256);
  executorch::extension::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    es_f32_qc8w_actsparse_linear_cols(&down, 0.0f, rows, hp, yp, static_cast<size_t>(c0) * 256,
                                      std::min(outs, static_cast<size_t>(c1) * 256));
  });
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgesparse, "bcsr_linear.out", bcsr_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "bcsr_conv1x1.out", bcsr_conv1x1_out);
EXECUTORCH_LIBRARY(edgesparse, "bcsr_conv1x1_fused.out", bcsr_conv1x1_fused_out);
EXECUTORCH_LIBRARY(edgesparse, "dwconv3x3.out", dwconv3x3_out);
EXECUTORCH_LIBRARY(edgesparse, "nm_linear.out", nm_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "nm_conv1x1.out", nm_conv1x1_out);
EXECUTORCH_LIBRARY(edgesparse, "actsparse_linear.out", actsparse_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "actsparse_gated_mlp.out", actsparse_gated_mlp_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_bcsr_linear.out", qs8_bcsr_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_bcsr_conv1x1.out", qs8_bcsr_conv1x1_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_dwconv3x3.out", qs8_dwconv3x3_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_add.out", qs8_add_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_actsparse_linear.out", qs8_actsparse_linear_out);
EXECUTORCH_LIBRARY(edgesparse, "qs8_actsparse_gated_mlp.out", qs8_actsparse_gated_mlp_out);
