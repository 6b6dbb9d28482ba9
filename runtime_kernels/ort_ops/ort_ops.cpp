// ONNX Runtime custom-op library for the edgesparse kernels, domain "ai.edgesparse":
//   BcsrLinear(x, values, col_idx, row_ptr, bias?)  attrs block_rows, block_cols (default 1), in_features, out_features
//   BcsrConv1x1(x, values, col_idx, row_ptr, bias?) same attrs, x in NCHW
//   NmLinear(x, values, idx, bias?)                 attrs n, m, in_features, out_features
//   NmConv1x1(x, values, idx, bias?)                same attrs, x in NCHW
//   ActSparseLinear(x, weight_t, bias?)             attr threshold
//   ActSparseGatedMLP(x, gate, bundle, gate_bias?, up_bias?, down_bias?)  attrs threshold, activation
//   QBcsrLinear, QActSparseLinear, QActSparseGatedMLP: int8 weights (further down)
// The nodes are what torch.onnx emits for edgesparse's sparse modules (runtime_kernels/modules.py).
// Load with SessionOptions.register_custom_ops_library(path) or edgesparse.ort_session(path).
// Work is split across the session's intra-op threads (intra_op_num_threads) on ORT >= 1.17, which
// lends its pool to custom ops; on 1.16 the kernels run on the calling thread.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "edgesparse/kernels.h"
#include "ort_abi.h"

namespace {

using namespace ort_abi;

Api g_api{nullptr};
bool g_parallel = false;  // the runtime's table has KernelContext_ParallelFor (API >= 17)

// ---- threads ----------------------------------------------------------------------------------
// A call is cut into pieces of equal work (multiply-adds: the nonzeros in row_ptr for BCSR, not
// the row count, since a pruned layer's rows differ a lot), whole row blocks / outputs / column
// chunks each, so results are bit-identical across thread counts. Below kMinMacsPerPiece * 2
// multiply-adds a call runs on the calling thread: handing out pieces on ORT's pool costs more
// than such a call gains (the cause of the sparse MobileNetV2's slowdown at 2 threads, whose
// layers were cut into pieces of 16k multiply-adds). ORT does not tell a custom op its pool size:
// kMaxPieces leaves spare pieces for the threads of any usual pool to balance with.
constexpr int64_t kMinMacsPerPiece = int64_t{1} << 17;
constexpr int64_t kMaxPieces = 16;

size_t pieces(size_t units, int64_t work) {
  if (!g_parallel || work < 2 * kMinMacsPerPiece) return 1;
  return static_cast<size_t>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(units), work / kMinMacsPerPiece, kMaxPieces})));
}

// body(u0, u1) over [0, units), cut into pieces of equal cost; cost_before(u) is the cost of units
// [0, u) (non-decreasing; cost_before(units) the whole call's multiply-adds). On ORT's intra-op
// threads where the runtime lends them (API >= 17), else here.
template <typename Cost, typename Body>
void parallel(OrtKernelContext* ctx, size_t units, const Cost& cost_before, const Body& body) {
  const int64_t total = cost_before(units);
  const size_t n = pieces(units, total);
  if (n <= 1) {
    body(size_t{0}, units);
    return;
  }
  std::vector<size_t> bounds(n + 1, units);
  bounds[0] = 0;
  for (size_t i = 1; i < n; i++) {  // the first unit at or past i/n of the cost
    const int64_t target = total / static_cast<int64_t>(n) * static_cast<int64_t>(i) +
                           total % static_cast<int64_t>(n) * static_cast<int64_t>(i) / static_cast<int64_t>(n);
    size_t lo = bounds[i - 1], hi = units;
    while (lo < hi) {
      const size_t mid = lo + (hi - lo) / 2;
      if (cost_before(mid) < target) lo = mid + 1;
      else hi = mid;
    }
    bounds[i] = lo;
  }
  struct Job {
    const Body* body;
    const size_t* bounds;
  } job{&body, bounds.data()};
  auto piece = [](void* data, size_t i) {
    const Job& j = *static_cast<const Job*>(data);
    if (j.bounds[i] < j.bounds[i + 1]) (*j.body)(j.bounds[i], j.bounds[i + 1]);
  };
  OrtStatus* status = g_api.call<KernelContext_ParallelForFn>(KernelContext_ParallelFor, ctx, piece, n, size_t{0}, &job);
  if (!status) return;
  g_api.call<ReleaseStatusFn>(ReleaseStatus, status);  // then run it here: pieces write disjoint outputs
  for (size_t i = 0; i < n; i++) piece(&job, i);
}

// Units of equal cost: `work` multiply-adds over `units`.
template <typename Body>
void parallel_uniform(OrtKernelContext* ctx, size_t units, int64_t work, const Body& body) {
  const int64_t per_unit = units ? std::max<int64_t>(1, work / static_cast<int64_t>(units)) : 1;
  parallel(ctx, units, [per_unit](size_t u) { return static_cast<int64_t>(u) * per_unit; }, body);
}

// The row blocks of a BCSR weight over `rows` input rows (or pixels): each block costs its
// nonzeros times the rows, plus one (its bias and the store of its outputs).
template <typename Body>
void parallel_row_blocks(OrtKernelContext* ctx, const es_bcsr_f32& w, size_t rows, const Body& body) {
  const int64_t macs = static_cast<int64_t>(w.block_rows * w.block_cols * rows);
  const int32_t* row_ptr = w.row_ptr;
  parallel(ctx, es_bcsr_row_blocks(&w), [=](size_t b) { return (static_cast<int64_t>(row_ptr[b]) + static_cast<int64_t>(b)) * macs; },
           body);
}

// A tensor view: dims, element type and data pointer of one OrtValue.
struct View {
  std::vector<int64_t> dims;
  ONNXTensorElementDataType type{};
  void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

#define ES_ORT_TRY(expr)                      \
  do {                                        \
    if (OrtStatus* status_ = (expr)) return status_; \
  } while (0)

OrtStatus* error(const std::string& msg) {
  return g_api.call<CreateStatusFn>(CreateStatus, ORT_INVALID_ARGUMENT, msg.c_str());
}

OrtStatus* describe(const OrtValue* value, View* view) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ES_ORT_TRY(g_api.call<GetTensorTypeAndShapeFn>(GetTensorTypeAndShape, value, &info));
  size_t count = 0;
  OrtStatus* status = g_api.call<GetDimensionsCountFn>(GetDimensionsCount, info, &count);
  if (!status) {
    view->dims.resize(count);
    status = g_api.call<GetDimensionsFn>(GetDimensions, info, view->dims.data(), count);
  }
  if (!status) status = g_api.call<GetTensorElementTypeFn>(GetTensorElementType, info, &view->type);
  g_api.call<ReleaseTensorTypeAndShapeInfoFn>(ReleaseTensorTypeAndShapeInfo, info);
  if (!status) status = g_api.call<GetTensorMutableDataFn>(GetTensorMutableData, const_cast<OrtValue*>(value), &view->data);
  return status;
}

// Input `index`; `present` is false for an omitted optional input.
OrtStatus* input(OrtKernelContext* ctx, size_t index, View* view, bool* present = nullptr) {
  size_t count = 0;
  ES_ORT_TRY(g_api.call<KernelContext_GetInputCountFn>(KernelContext_GetInputCount, ctx, &count));
  const OrtValue* value = nullptr;
  if (index < count) ES_ORT_TRY(g_api.call<KernelContext_GetInputFn>(KernelContext_GetInput, ctx, index, &value));
  if (present) *present = value != nullptr;
  if (!value) return present ? nullptr : error("edgesparse: missing input " + std::to_string(index));
  return describe(value, view);
}

OrtStatus* output(OrtKernelContext* ctx, const std::vector<int64_t>& dims, float** data) {
  OrtValue* value = nullptr;
  ES_ORT_TRY(g_api.call<KernelContext_GetOutputFn>(KernelContext_GetOutput, ctx, 0, dims.data(), dims.size(), &value));
  return g_api.call<GetTensorMutableDataFn>(GetTensorMutableData, value, reinterpret_cast<void**>(data));
}

// ---- the ops -------------------------------------------------------------------------------

struct BcsrKernel {
  int64_t block_rows = 0, block_cols = 1, in_features = 0, out_features = 0;
  bool conv = false;
};

struct NmKernel {
  int64_t n = 0, m = 0, in_features = 0, out_features = 0;
  bool conv = false;
};

struct ActSparseKernel {
  float threshold = 0.0f;
  int64_t activation = ES_ACT_SILU;  // ActSparseGatedMLP only
};

OrtStatus* optional_bias(OrtKernelContext* ctx, size_t index, int64_t out_features, const float** data) {
  View bias;
  bool has_bias = false;
  ES_ORT_TRY(input(ctx, index, &bias, &has_bias));
  if (has_bias && (bias.type != ORT_FLOAT || bias.numel() != out_features))
    return error("edgesparse: bias must be float [out_features]");
  *data = has_bias ? static_cast<const float*>(bias.data) : nullptr;
  return nullptr;
}

// Checks of the BCSR operands (es_bcsr_check, shared with the ExecuTorch ops); fills `w`.
OrtStatus* bcsr_weights(const BcsrKernel& k, OrtKernelContext* ctx, es_bcsr_f32* w) {
  View values, col_idx, row_ptr;
  const float* bias = nullptr;
  ES_ORT_TRY(input(ctx, 1, &values));
  ES_ORT_TRY(input(ctx, 2, &col_idx));
  ES_ORT_TRY(input(ctx, 3, &row_ptr));
  ES_ORT_TRY(optional_bias(ctx, 4, k.out_features, &bias));
  if (values.type != ORT_FLOAT || col_idx.type != ORT_INT32 || row_ptr.type != ORT_INT32 || row_ptr.numel() < 1)
    return error("edgesparse: malformed BCSR weights (values float, col_idx / row_ptr int32)");
  if (const char* why = es_bcsr_check(k.out_features, k.in_features, k.block_rows, k.block_cols,
                                      static_cast<const int32_t*>(row_ptr.data), row_ptr.numel(), col_idx.numel(), values.numel()))
    return error(std::string("edgesparse: ") + why);
  *w = es_bcsr_f32{static_cast<size_t>(k.out_features), static_cast<size_t>(k.in_features),
                   static_cast<size_t>(k.block_rows), static_cast<size_t>(k.block_cols),
                   static_cast<const float*>(values.data), static_cast<const int32_t*>(col_idx.data),
                   static_cast<const int32_t*>(row_ptr.data), bias};
  return nullptr;
}

// The output of a linear-like (x [..., in]) or NCHW conv op; y points at its data.
OrtStatus* prepare(OrtKernelContext* ctx, const View& x, bool conv, int64_t in_features, int64_t out_features, float** y) {
  if (x.type != ORT_FLOAT) return error("edgesparse: x must be float");
  std::vector<int64_t> dims = x.dims;
  if (conv) {
    if (x.dims.size() != 4 || x.dims[1] != in_features)
      return error("edgesparse: conv input must be NCHW with " + std::to_string(in_features) + " channels");
    dims[1] = out_features;
  } else {
    if (x.dims.empty() || x.dims.back() != in_features)
      return error("edgesparse: linear input must end in " + std::to_string(in_features) + " features");
    dims.back() = out_features;
  }
  return output(ctx, dims, y);
}

OrtStatus* bcsr_compute(const BcsrKernel& k, OrtKernelContext* ctx) {
  View x;
  es_bcsr_f32 w;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(bcsr_weights(k, ctx, &w));
  ES_ORT_TRY(prepare(ctx, x, k.conv, k.in_features, k.out_features, &y));
  const float* xp = static_cast<const float*>(x.data);
  if (k.conv) {
    const size_t pixels = static_cast<size_t>(x.dims[2] * x.dims[3]);
    for (int64_t n = 0; n < x.dims[0]; n++) {
      const float* xn = xp + n * k.in_features * pixels;
      float* yn = y + n * k.out_features * pixels;
      parallel_row_blocks(ctx, w, pixels, [&](size_t b0, size_t b1) { es_f32_bcsr_conv1x1_nchw_blocks(&w, pixels, xn, yn, b0, b1); });
    }
  } else {
    const size_t rows = static_cast<size_t>(x.numel() / k.in_features);
    parallel_row_blocks(ctx, w, rows, [&](size_t b0, size_t b1) { es_f32_bcsr_linear_blocks(&w, rows, xp, y, b0, b1); });
  }
  return nullptr;
}

OrtStatus* nm_compute(const NmKernel& k, OrtKernelContext* ctx) {
  View x, values, idx;
  const float* bias = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &values));
  ES_ORT_TRY(input(ctx, 2, &idx));
  ES_ORT_TRY(optional_bias(ctx, 3, k.out_features, &bias));
  if (values.type != ORT_FLOAT || idx.type != ORT_UINT8) return error("edgesparse: N:M values must be float, idx uint8");
  if (const char* why = es_nm_check(k.out_features, k.in_features, k.n, k.m, values.numel(), idx.numel()))
    return error(std::string("edgesparse: ") + why);
  ES_ORT_TRY(prepare(ctx, x, k.conv, k.in_features, k.out_features, &y));
  const es_nm_f32 w{static_cast<size_t>(k.out_features), static_cast<size_t>(k.in_features), static_cast<size_t>(k.n),
                    static_cast<size_t>(k.m), static_cast<const float*>(values.data),
                    static_cast<const uint8_t*>(idx.data), bias};
  const float* xp = static_cast<const float*>(x.data);
  const size_t outs = static_cast<size_t>(k.out_features);
  if (k.conv) {
    const size_t pixels = static_cast<size_t>(x.dims[2] * x.dims[3]);
    for (int64_t n = 0; n < x.dims[0]; n++) {
      const float* xn = xp + n * k.in_features * pixels;
      float* yn = y + n * k.out_features * pixels;
      parallel_uniform(ctx, outs, values.numel() * static_cast<int64_t>(pixels),
                       [&](size_t o0, size_t o1) { es_f32_nm_conv1x1_nchw_outs(&w, pixels, xn, yn, o0, o1); });
    }
  } else {
    const size_t rows = static_cast<size_t>(x.numel() / k.in_features);
    parallel_uniform(ctx, outs, values.numel() * static_cast<int64_t>(rows),
                     [&](size_t o0, size_t o1) { es_f32_nm_linear_outs(&w, rows, xp, y, o0, o1); });
  }
  return nullptr;
}

OrtStatus* actsparse_compute(const ActSparseKernel& k, OrtKernelContext* ctx) {
  View x, wt;
  const float* bias = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &wt));
  if (wt.type != ORT_FLOAT || wt.dims.size() != 2)
    return error("edgesparse::ActSparseLinear: float x [..., in], weight_t [in, out], bias [out] expected");
  ES_ORT_TRY(optional_bias(ctx, 2, wt.dims[1], &bias));
  ES_ORT_TRY(prepare(ctx, x, false, wt.dims[0], wt.dims[1], &y));
  const es_actsparse_f32 w{static_cast<size_t>(wt.dims[1]), static_cast<size_t>(wt.dims[0]),
                           static_cast<const float*>(wt.data), bias, 0};
  const size_t rows = static_cast<size_t>(x.numel() / wt.dims[0]);
  const size_t chunks = (w.out + 255) / 256;  // whole cache lines of outputs per piece
  parallel_uniform(ctx, chunks, static_cast<int64_t>(w.in * w.out * rows), [&](size_t c0, size_t c1) {
    es_f32_actsparse_linear_cols(&w, k.threshold, rows, static_cast<const float*>(x.data), y, c0 * 256,
                                 std::min(w.out, c1 * 256));
  });
  return nullptr;
}

OrtStatus* gated_mlp_compute(const ActSparseKernel& k, OrtKernelContext* ctx) {
  View x, gate, bundle;
  const float *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr, *thresholds = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &gate));
  ES_ORT_TRY(input(ctx, 2, &bundle));
  if (gate.type != ORT_FLOAT || bundle.type != ORT_FLOAT || gate.dims.size() != 2 || bundle.dims.size() != 2 ||
      bundle.dims[0] != gate.dims[1] || bundle.dims[1] <= gate.dims[0] || (k.activation != ES_ACT_SILU && k.activation != ES_ACT_RELU))
    return error("edgesparse::ActSparseGatedMLP: gate [in, hidden], bundle [hidden, in + out] float, activation 0/1 expected");
  const int64_t in = gate.dims[0], hidden = gate.dims[1], outs = bundle.dims[1] - in;
  ES_ORT_TRY(optional_bias(ctx, 3, hidden, &gate_bias));
  ES_ORT_TRY(optional_bias(ctx, 4, hidden, &up_bias));
  ES_ORT_TRY(optional_bias(ctx, 5, outs, &down_bias));
  ES_ORT_TRY(optional_bias(ctx, 6, hidden, &thresholds));  // per-neuron thresholds (CHESS)
  ES_ORT_TRY(prepare(ctx, x, false, in, outs, &y));
  const es_gated_mlp_f32 w{static_cast<size_t>(in), static_cast<size_t>(hidden), static_cast<size_t>(outs),
                           static_cast<const float*>(gate.data), static_cast<const float*>(bundle.data),
                           gate_bias, up_bias, down_bias, static_cast<int>(k.activation), thresholds};
  const size_t rows = static_cast<size_t>(x.numel() / in);
  std::vector<float> h(rows * w.hidden);
  const float* xp = static_cast<const float*>(x.data);
  parallel_uniform(ctx, w.hidden, static_cast<int64_t>(2 * w.in * w.hidden * rows),
                   [&](size_t i0, size_t i1) { es_f32_gated_mlp_hidden(&w, k.threshold, rows, xp, h.data(), i0, i1); });
  const es_actsparse_f32 down = es_gated_mlp_down(&w);
  const size_t chunks = (w.out + 255) / 256;
  parallel_uniform(ctx, chunks, static_cast<int64_t>(w.hidden * w.out * rows), [&](size_t c0, size_t c1) {
    es_f32_actsparse_linear_cols(&down, 0.0f, rows, h.data(), y, c0 * 256, std::min(w.out, c1 * 256));
  });
  return nullptr;
}

// ---- OrtCustomOp tables --------------------------------------------------------------------

OrtStatus* int_attr(const OrtKernelInfo* info, const char* name, int64_t* out) {
  return g_api.call<KernelInfoGetAttribute_int64Fn>(KernelInfoGetAttribute_int64, info, name, out);
}

struct OpDef {  // standard layout, `op` first: ORT hands back &op and def() recovers the OpDef
  OrtCustomOp op;
  const char* name;
  size_t input_count;
  ONNXTensorElementDataType inputs[7];
  size_t optional_from;  // inputs at and after this index are optional (biases, thresholds)
};

const OpDef& def(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

// an int attribute that may be absent (older exports): `fallback` then
OrtStatus* int_attr_or(const OrtKernelInfo* info, const char* name, int64_t fallback, int64_t* out) {
  if (OrtStatus* status = int_attr(info, name, out)) {
    g_api.call<ReleaseStatusFn>(ReleaseStatus, status);
    *out = fallback;
  }
  return nullptr;
}

// Creates kernel K, reading its attributes with `read`; `conv` from the op name.
template <typename K, typename Read>
OrtStatus* create_with(const OrtCustomOp* op, const OrtKernelInfo* info, void** kernel, Read read) {
  auto* k = new K;
  k->conv = std::string(def(op).name).find("Conv1x1") != std::string::npos;
  OrtStatus* status = read(*k);
  if (!status) status = int_attr(info, "in_features", &k->in_features);
  if (!status) status = int_attr(info, "out_features", &k->out_features);
  if (status) {
    delete k;
    return status;
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* create_bcsr(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  return create_with<BcsrKernel>(op, info, kernel, [&](BcsrKernel& k) {
    OrtStatus* status = int_attr(info, "block_rows", &k.block_rows);
    return status ? status : int_attr_or(info, "block_cols", 1, &k.block_cols);
  });
}

OrtStatus* create_nm(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  return create_with<NmKernel>(op, info, kernel, [&](NmKernel& k) {
    OrtStatus* status = int_attr(info, "n", &k.n);
    return status ? status : int_attr(info, "m", &k.m);
  });
}

OrtStatus* create_actsparse(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* k = new ActSparseKernel;
  OrtStatus* status = g_api.call<KernelInfoGetAttribute_floatFn>(KernelInfoGetAttribute_float, info, "threshold", &k->threshold);
  if (!status) status = int_attr_or(info, "activation", ES_ACT_SILU, &k->activation);
  if (status) {
    delete k;
    return status;
  }
  *kernel = k;
  return nullptr;
}

OrtCustomOp make_op(OrtStatus* (*create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**),
                    OrtStatus* (*compute)(void*, OrtKernelContext*), void (*destroy)(void*)) {
  OrtCustomOp op{};
  op.version = kApiVersion;
  op.GetName = [](const OrtCustomOp* o) { return def(o).name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };
  op.GetInputType = [](const OrtCustomOp* o, size_t i) { return def(o).inputs[i]; };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return def(o).input_count; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ORT_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return i >= def(o).optional_from ? ORT_OPTIONAL : ORT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return ORT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  return op;
}

OrtStatus* compute_bcsr(void* k, OrtKernelContext* ctx) { return bcsr_compute(*static_cast<BcsrKernel*>(k), ctx); }
OrtStatus* compute_gated_mlp(void* k, OrtKernelContext* ctx) {
  return gated_mlp_compute(*static_cast<ActSparseKernel*>(k), ctx);
}
OrtStatus* compute_nm(void* k, OrtKernelContext* ctx) { return nm_compute(*static_cast<NmKernel*>(k), ctx); }
OrtStatus* compute_actsparse(void* k, OrtKernelContext* ctx) {
  return actsparse_compute(*static_cast<ActSparseKernel*>(k), ctx);
}
void destroy_bcsr(void* k) { delete static_cast<BcsrKernel*>(k); }
void destroy_nm(void* k) { delete static_cast<NmKernel*>(k); }
void destroy_actsparse(void* k) { delete static_cast<ActSparseKernel*>(k); }

OpDef g_ops[] = {
    {make_op(create_bcsr, compute_bcsr, destroy_bcsr), "BcsrLinear", 5, {ORT_FLOAT, ORT_FLOAT, ORT_INT32, ORT_INT32, ORT_FLOAT}, 4},
    {make_op(create_bcsr, compute_bcsr, destroy_bcsr), "BcsrConv1x1", 5, {ORT_FLOAT, ORT_FLOAT, ORT_INT32, ORT_INT32, ORT_FLOAT}, 4},
    {make_op(create_nm, compute_nm, destroy_nm), "NmLinear", 4, {ORT_FLOAT, ORT_FLOAT, ORT_UINT8, ORT_FLOAT}, 3},
    {make_op(create_nm, compute_nm, destroy_nm), "NmConv1x1", 4, {ORT_FLOAT, ORT_FLOAT, ORT_UINT8, ORT_FLOAT}, 3},
    {make_op(create_actsparse, compute_actsparse, destroy_actsparse), "ActSparseLinear", 3, {ORT_FLOAT, ORT_FLOAT, ORT_FLOAT}, 2},
    {make_op(create_actsparse, compute_gated_mlp, destroy_actsparse), "ActSparseGatedMLP", 7,
     {ORT_FLOAT, ORT_FLOAT, ORT_FLOAT, ORT_FLOAT, ORT_FLOAT, ORT_FLOAT, ORT_FLOAT}, 3},
};

// ---- activation sparsity on int8 weights (src/qs8-actsparse) --------------------------------
//   QActSparseLinear(x, weight_t int8, scales, bias?)                attrs threshold, dynamic
//   QActSparseGatedMLP(x, gate_t int8, bundle int8, scales, biases?, thresholds?)  attrs threshold, activation

constexpr ONNXTensorElementDataType kOrtInt8 = static_cast<ONNXTensorElementDataType>(3);  // TensorProto INT8

struct QActSparseKernel {
  float threshold = 0.0f;
  int64_t dynamic = 0;               // QActSparseLinear: 1 quantizes x per row
  int64_t activation = ES_ACT_SILU;  // QActSparseGatedMLP
};

OrtStatus* create_qs8_actsparse(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* k = new QActSparseKernel;
  OrtStatus* status = g_api.call<KernelInfoGetAttribute_floatFn>(KernelInfoGetAttribute_float, info, "threshold", &k->threshold);
  if (!status) status = int_attr_or(info, "dynamic", 0, &k->dynamic);
  if (!status) status = int_attr_or(info, "activation", ES_ACT_SILU, &k->activation);
  if (status) {
    delete k;
    return status;
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* compute_qs8_actsparse(void* kernel, OrtKernelContext* ctx) {
  const auto& k = *static_cast<QActSparseKernel*>(kernel);
  View x, wt, scales;
  const float* bias = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &wt));
  ES_ORT_TRY(input(ctx, 2, &scales));
  if (wt.type != kOrtInt8 || wt.dims.size() != 2 || scales.type != ORT_FLOAT || scales.numel() != wt.dims[1] ||
      (k.dynamic != 0 && k.dynamic != 1))
    return error("edgesparse::QActSparseLinear: float x [..., in], int8 weight_t [in, out], float scales [out], bias [out] expected");
  ES_ORT_TRY(optional_bias(ctx, 3, wt.dims[1], &bias));
  ES_ORT_TRY(prepare(ctx, x, false, wt.dims[0], wt.dims[1], &y));
  const es_actsparse_qc8w w{static_cast<size_t>(wt.dims[1]), static_cast<size_t>(wt.dims[0]),
                            static_cast<const int8_t*>(wt.data), static_cast<const float*>(scales.data), bias, 0};
  const size_t rows = static_cast<size_t>(x.numel() / wt.dims[0]);
  const float* xp = static_cast<const float*>(x.data);
  std::vector<int8_t> xq(k.dynamic ? rows * w.in : 0);
  std::vector<float> x_scale(k.dynamic ? rows : 0);
  if (k.dynamic) es_qs8_quantize_rows(rows, w.in, xp, xq.data(), x_scale.data());
  const size_t chunks = (w.out + 255) / 256;
  parallel_uniform(ctx, chunks, static_cast<int64_t>(w.in * w.out * rows), [&](size_t c0, size_t c1) {
    const size_t o0 = c0 * 256, o1 = std::min(w.out, c1 * 256);
    if (k.dynamic)
      es_qs8_actsparse_linear_cols(&w, k.threshold, rows, xp, xq.data(), x_scale.data(), y, o0, o1);
    else
      es_f32_qc8w_actsparse_linear_cols(&w, k.threshold, rows, xp, y, o0, o1);
  });
  return nullptr;
}

OrtStatus* compute_qs8_gated_mlp(void* kernel, OrtKernelContext* ctx) {
  const auto& k = *static_cast<QActSparseKernel*>(kernel);
  View x, gate, bundle, scales;
  const float *biases = nullptr, *thresholds = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &gate));
  ES_ORT_TRY(input(ctx, 2, &bundle));
  ES_ORT_TRY(input(ctx, 3, &scales));
  if (gate.type != kOrtInt8 || bundle.type != kOrtInt8 || gate.dims.size() != 2 || bundle.dims.size() != 2 ||
      bundle.dims[0] != gate.dims[1] || bundle.dims[1] <= gate.dims[0] || scales.type != ORT_FLOAT ||
      scales.numel() != 2 * gate.dims[1] + bundle.dims[1] - gate.dims[0] ||
      (k.activation != ES_ACT_SILU && k.activation != ES_ACT_RELU))
    return error("edgesparse::QActSparseGatedMLP: int8 gate_t [in, hidden], int8 bundle [hidden, in + out], float scales [2 hidden + out], activation 0/1 expected");
  const int64_t in = gate.dims[0], hidden = gate.dims[1], outs = bundle.dims[1] - in;
  ES_ORT_TRY(optional_bias(ctx, 4, scales.numel(), &biases));
  ES_ORT_TRY(optional_bias(ctx, 5, hidden, &thresholds));  // per-neuron thresholds (CHESS)
  ES_ORT_TRY(prepare(ctx, x, false, in, outs, &y));
  const float* sp = static_cast<const float*>(scales.data);
  const es_gated_mlp_qc8w w{static_cast<size_t>(in), static_cast<size_t>(hidden), static_cast<size_t>(outs),
                            static_cast<const int8_t*>(gate.data), sp, static_cast<const int8_t*>(bundle.data),
                            sp + hidden, sp + 2 * hidden, biases, biases ? biases + hidden : nullptr,
                            biases ? biases + 2 * hidden : nullptr, static_cast<int>(k.activation), thresholds};
  const size_t rows = static_cast<size_t>(x.numel() / in);
  std::vector<float> h(rows * w.hidden);
  const float* xp = static_cast<const float*>(x.data);
  const size_t tiles = (w.hidden + 63) / 64;  // the GEMV's register tile: pieces of whole tiles
  parallel_uniform(ctx, tiles, static_cast<int64_t>(2 * w.in * w.hidden * rows), [&](size_t a, size_t b) {
    es_f32_qc8w_gated_mlp_hidden(&w, k.threshold, rows, xp, h.data(), a * 64, std::min(w.hidden, b * 64));
  });
  const es_actsparse_qc8w down = es_gated_mlp_qc8w_down(&w);
  const size_t chunks = (w.out + 255) / 256;
  parallel_uniform(ctx, chunks, static_cast<int64_t>(w.hidden * w.out * rows), [&](size_t c0, size_t c1) {
    es_f32_qc8w_actsparse_linear_cols(&down, 0.0f, rows, h.data(), y, c0 * 256, std::min(w.out, c1 * 256));
  });
  return nullptr;
}

void destroy_qs8_actsparse(void* k) { delete static_cast<QActSparseKernel*>(k); }

// QBcsrLinear(x, values int8, col_idx, row_ptr, scales, bias?)  attrs block_rows, in_features, out_features:
// int8 BCSR Rx1 (blocks in groups of four, formats.pack_qs8_bcsr), x quantized per row here.
OrtStatus* compute_qs8_bcsr(void* kernel, OrtKernelContext* ctx) {
  const auto& k = *static_cast<BcsrKernel*>(kernel);
  View x, values, col_idx, row_ptr, scales;
  const float* bias = nullptr;
  float* y = nullptr;
  ES_ORT_TRY(input(ctx, 0, &x));
  ES_ORT_TRY(input(ctx, 1, &values));
  ES_ORT_TRY(input(ctx, 2, &col_idx));
  ES_ORT_TRY(input(ctx, 3, &row_ptr));
  ES_ORT_TRY(input(ctx, 4, &scales));
  ES_ORT_TRY(optional_bias(ctx, 5, k.out_features, &bias));
  if (values.type != kOrtInt8 || col_idx.type != ORT_INT32 || row_ptr.type != ORT_INT32 || row_ptr.numel() < 1 ||
      scales.type != ORT_FLOAT || scales.numel() != k.out_features)
    return error("edgesparse::QBcsrLinear: int8 values, int32 col_idx / row_ptr, float scales [out_features] expected");
  if (const char* why = es_qs8_bcsr_check(k.out_features, k.in_features, k.block_rows, static_cast<const int32_t*>(row_ptr.data),
                                          row_ptr.numel(), col_idx.numel(), values.numel()))
    return error(std::string("edgesparse::QBcsrLinear: ") + why);
  ES_ORT_TRY(prepare(ctx, x, false, k.in_features, k.out_features, &y));
  const es_bcsr_qs8 w{static_cast<size_t>(k.out_features), static_cast<size_t>(k.in_features),
                      static_cast<size_t>(k.block_rows), static_cast<const int8_t*>(values.data),
                      static_cast<const int32_t*>(col_idx.data), static_cast<const int32_t*>(row_ptr.data),
                      static_cast<const float*>(scales.data), bias};
  const size_t rows = static_cast<size_t>(x.numel() / k.in_features);
  std::vector<int8_t> xq(rows * w.in);
  std::vector<float> x_scale(rows);
  es_qs8_quantize_rows(rows, w.in, static_cast<const float*>(x.data), xq.data(), x_scale.data());
  std::vector<uint8_t> tiles(es_qs8_tiles_bytes(rows, w.in));  // many rows: transposed once, shared by every piece
  if (!tiles.empty()) es_qs8_make_tiles(rows, w.in, xq.data(), tiles.data());
  const int64_t macs = static_cast<int64_t>(w.block_rows * rows);
  const int32_t* rp = w.row_ptr;
  parallel(ctx, (w.out + w.block_rows - 1) / w.block_rows,
           [=](size_t b) { return (static_cast<int64_t>(rp[b]) + static_cast<int64_t>(b)) * macs; },
           [&](size_t b0, size_t b1) {
             es_qs8_bcsr_linear_blocks(&w, rows, xq.data(), tiles.empty() ? nullptr : tiles.data(), x_scale.data(), y,
                                       nullptr, b0, b1);
           });
  return nullptr;
}

OpDef g_qs8_actsparse_ops[] = {
    {make_op(create_qs8_actsparse, compute_qs8_actsparse, destroy_qs8_actsparse), "QActSparseLinear", 4,
     {ORT_FLOAT, kOrtInt8, ORT_FLOAT, ORT_FLOAT}, 3},
    {make_op(create_qs8_actsparse, compute_qs8_gated_mlp, destroy_qs8_actsparse), "QActSparseGatedMLP", 6,
     {ORT_FLOAT, kOrtInt8, kOrtInt8, ORT_FLOAT, ORT_FLOAT, ORT_FLOAT}, 4},
    {make_op(create_bcsr, compute_qs8_bcsr, destroy_bcsr), "QBcsrLinear", 6,
     {ORT_FLOAT, kOrtInt8, ORT_INT32, ORT_INT32, ORT_FLOAT, ORT_FLOAT}, 5},
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(kParallelApiVersion);
  g_parallel = table != nullptr;
  if (!table) table = base->GetApi(kApiVersion);
  if (!table) {  // a runtime older than API 16 (ORT 1.16) has no table to report the error through
    fprintf(stderr, "edgesparse: ONNX Runtime %s is too old for the op library (needs 1.16 or newer)\n",
            base->GetVersionString());
    return nullptr;
  }
  g_api.table = table;
  OrtCustomOpDomain* domain = nullptr;
  ES_ORT_TRY(g_api.call<CreateCustomOpDomainFn>(CreateCustomOpDomain, "ai.edgesparse", &domain));
  for (OpDef& op : g_ops) ES_ORT_TRY(g_api.call<CustomOpDomain_AddFn>(CustomOpDomain_Add, domain, &op.op));
  for (OpDef& op : g_qs8_actsparse_ops) ES_ORT_TRY(g_api.call<CustomOpDomain_AddFn>(CustomOpDomain_Add, domain, &op.op));
  // The session options keep the domain pointer: it lives until the process exits.
  return g_api.call<AddCustomOpDomainFn>(AddCustomOpDomain, options, domain);
}
