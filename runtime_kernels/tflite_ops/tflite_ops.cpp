// TFLite / LiteRT custom-op library for the edgesparse kernels (TFLite tensors are NHWC, so a
// 1x1 stride-1 conv is the linear kernel over N*H*W pixel rows):
//   EdgesparseBcsrLinear(x, values, col_idx, row_ptr, bias?)    x [..., in]
//   EdgesparseBcsrConv1x1(x, values, col_idx, row_ptr, bias?)   x [N, H, W, in] (NHWC)
//   EdgesparseNmLinear(x, values, idx, bias?)                   x [..., in]
//   EdgesparseNmConv1x1(x, values, idx, bias?)                  x [N, H, W, in] (NHWC)
// values float32, col_idx / row_ptr int32, idx uint8, bias float32 [out] (or the optional -1),
// all constant tensors of the model. Attributes: the op's custom options, 32 bytes little-endian:
//   0 "ESP1"  4 out_features  8 in_features  12 block_rows | n  16 block_cols | m
//   20 fused activation (TFLite's numbering: 0 none, 1 relu, 2 relu_n1_to_1, 3 relu6)
//   24 keep_dims (1: output [..., out]; 0: [rows, out], FULLY_CONNECTED's default)  28 reserved 0
// Bad options or operands fail at prepare with one reported line; nothing runs.
//
// Registration: EdgesparseTfliteRegisterer(tflite::MutableOpResolver*) is what ai-edge-litert's
// InterpreterWithCustomOps(custom_op_registerers=["EdgesparseTfliteRegisterer"]) calls. The
// resolver's AddCustom is not exported by the wheel (its libpywrap_litert_common.so keeps it as a
// LOCAL symbol in .symtab), so it is found by name in the .symtab of the loaded LiteRT library
// (see find_add_custom); EdgesparseTfliteStatus() says why when it is not there. The kernels run on
// the interpreter's thread count (context->recommended_num_threads, i.e. num_threads): the
// calling thread plus persistent workers of this library's own pool.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "edgesparse/kernels.h"
#include "tflite_abi.h"

namespace {

constexpr size_t kOptionsBytes = 32;
enum Kind { kBcsr, kNm };
enum Activation { kNone = 0, kRelu = 1, kReluN1To1 = 2, kRelu6 = 3 };

struct Kernel {
  Kind kind = kBcsr;
  bool conv = false;
  uint32_t out = 0, in = 0, a = 0, b = 0, activation = 0, keep_dims = 0;
  std::string error;  // set by init when the custom options are unusable; reported at prepare
};

uint32_t u32(const unsigned char* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }

void* init(Kind kind, bool conv, const char* buffer, size_t length) {
  auto* k = new Kernel;
  k->kind = kind, k->conv = conv;
  const auto* p = reinterpret_cast<const unsigned char*>(buffer);
  if (!p || length != kOptionsBytes || std::memcmp(p, "ESP1", 4) != 0) {
    k->error = "custom options are not edgesparse's (want 32 bytes starting \"ESP1\", got " + std::to_string(length) + ")";
    return k;
  }
  k->out = u32(p + 4), k->in = u32(p + 8), k->a = u32(p + 12), k->b = u32(p + 16);
  k->activation = u32(p + 20), k->keep_dims = u32(p + 24);
  if (k->out == 0 || k->in == 0 || k->out > (1u << 24) || k->in > (1u << 24) || k->activation > kRelu6 || k->keep_dims > 1 ||
      u32(p + 28) != 0)
    k->error = "custom options out of range (out/in features, activation or flags)";
  else if (kind == kBcsr && !es_bcsr_shape_supported(k->a, k->b))
    k->error = "no BCSR kernel for " + std::to_string(k->a) + "x" + std::to_string(k->b) + " blocks";
  else if (kind == kNm && (k->a < 1 || k->a >= k->b || k->b > 255 || k->in % k->b))
    k->error = "bad N:M " + std::to_string(k->a) + ":" + std::to_string(k->b) + " for " + std::to_string(k->in) + " inputs";
  return k;
}

template <Kind K, bool Conv>
void* init_op(TfLiteContext*, const char* buffer, size_t length) {
  return init(K, Conv, buffer, length);
}

void free_op(TfLiteContext*, void* data) { delete static_cast<Kernel*>(data); }

const char* op_name(const Kernel& k) {
  if (k.kind == kBcsr) return k.conv ? "EdgesparseBcsrConv1x1" : "EdgesparseBcsrLinear";
  return k.conv ? "EdgesparseNmConv1x1" : "EdgesparseNmLinear";
}

TfLiteStatus fail(TfLiteContext* ctx, const Kernel& k, const std::string& why) {
  ctx->ReportError(ctx, "%s: %s", op_name(k), why.c_str());
  return kTfLiteError;
}

const TfLiteTensor* tensor(TfLiteContext* ctx, const TfLiteNode* node, int i) {
  if (i >= node->inputs->size) return nullptr;
  const int index = node->inputs->data[i];
  return index == kTfLiteOptionalTensor || index < 0 || static_cast<size_t>(index) >= ctx->tensors_size ? nullptr
                                                                                                       : &ctx->tensors[index];
}

size_t numel(const TfLiteTensor* t) {
  size_t n = 1;
  for (int i = 0; i < t->dims->size; i++) n *= static_cast<size_t>(t->dims->data[i] < 0 ? 0 : t->dims->data[i]);
  return n;
}

bool constant_of(const TfLiteTensor* t, int type) {
  return t && t->type == type && t->allocation_type == kTfLiteMmapRo && t->data && t->bytes == numel(t) * (type == kTfLiteUInt8 ? 1 : 4);
}

// The weights the kernels read, filled from the node's inputs; every operand checked first.
struct Weights {
  es_bcsr_f32 bcsr{};
  es_nm_f32 nm{};
};

// scan: also check every column index / N:M position (prepare does; invoke trusts the result).
TfLiteStatus weights(TfLiteContext* ctx, TfLiteNode* node, const Kernel& k, Weights* w, bool scan) {
  const int operands = k.kind == kBcsr ? 4 : 3;  // x + packed weights, then the optional bias
  if (node->inputs->size != operands && node->inputs->size != operands + 1)
    return fail(ctx, k, "expected " + std::to_string(operands) + " or " + std::to_string(operands + 1) + " inputs");
  const TfLiteTensor* bias = node->inputs->size > operands ? tensor(ctx, node, operands) : nullptr;
  if (bias && (!constant_of(bias, kTfLiteFloat32) || numel(bias) != k.out))
    return fail(ctx, k, "bias must be a constant float32 [" + std::to_string(k.out) + "]");
  const float* bias_data = bias ? static_cast<const float*>(bias->data) : nullptr;
  const TfLiteTensor* values = tensor(ctx, node, 1);
  if (!constant_of(values, kTfLiteFloat32)) return fail(ctx, k, "values must be a constant float32 tensor");
  if (k.kind == kBcsr) {
    const TfLiteTensor* col_idx = tensor(ctx, node, 2);
    const TfLiteTensor* row_ptr = tensor(ctx, node, 3);
    if (!constant_of(col_idx, kTfLiteInt32) || !constant_of(row_ptr, kTfLiteInt32) || numel(row_ptr) < 1)
      return fail(ctx, k, "col_idx and row_ptr must be constant int32 tensors");
    const auto* rows = static_cast<const int32_t*>(row_ptr->data);
    if (const char* why = es_bcsr_check(k.out, k.in, k.a, k.b, rows, numel(row_ptr), numel(col_idx), numel(values)))
      return fail(ctx, k, why);
    // the other runtimes trust the packer's column indices; a .tflite is a file, so check them once
    const auto* cols = static_cast<const int32_t*>(col_idx->data);
    for (size_t i = 0; scan && i < numel(col_idx); i++)
      if (cols[i] < 0 || static_cast<uint32_t>(cols[i]) + k.b > k.in) return fail(ctx, k, "col_idx out of range");
    w->bcsr = es_bcsr_f32{k.out, k.in, k.a, k.b, static_cast<const float*>(values->data), cols, rows, bias_data};
  } else {
    const TfLiteTensor* idx = tensor(ctx, node, 2);
    if (!constant_of(idx, kTfLiteUInt8)) return fail(ctx, k, "idx must be a constant uint8 tensor");
    if (const char* why = es_nm_check(k.out, k.in, k.a, k.b, numel(values), numel(idx))) return fail(ctx, k, why);
    const auto* positions = static_cast<const uint8_t*>(idx->data);
    for (size_t i = 0; scan && i < numel(idx); i++)
      if (positions[i] >= k.b) return fail(ctx, k, "idx holds a position >= m");
    w->nm = es_nm_f32{k.out, k.in, k.a, k.b, static_cast<const float*>(values->data), positions, bias_data};
  }
  return kTfLiteOk;
}

TfLiteStatus prepare(TfLiteContext* ctx, TfLiteNode* node) {
  const Kernel& k = *static_cast<Kernel*>(node->user_data);
  if (!k.error.empty()) return fail(ctx, k, k.error);
  if (node->outputs->size != 1) return fail(ctx, k, "expected one output");
  Weights w;
  if (weights(ctx, node, k, &w, true) != kTfLiteOk) return kTfLiteError;
  const TfLiteTensor* x = tensor(ctx, node, 0);
  if (!x || x->type != kTfLiteFloat32 || x->dims->size < 1 || static_cast<uint32_t>(x->dims->data[x->dims->size - 1]) != k.in)
    return fail(ctx, k, "input must be float32 with " + std::to_string(k.in) + " features last");
  if (k.conv && x->dims->size != 4) return fail(ctx, k, "conv input must be NHWC (4 dims)");
  TfLiteTensor* y = &ctx->tensors[node->outputs->data[0]];
  if (y->type != kTfLiteFloat32) return fail(ctx, k, "output must be float32");
  const bool keep = k.conv || k.keep_dims;
  const int rank = keep ? x->dims->size : 2;
  auto* dims = static_cast<TfLiteIntArray*>(std::malloc(sizeof(TfLiteIntArray) + sizeof(int) * rank));
  if (!dims) return fail(ctx, k, "out of memory");
  dims->size = rank;
  if (keep) {
    for (int i = 0; i < rank; i++) dims->data[i] = x->dims->data[i];
  } else {
    dims->data[0] = static_cast<int>(numel(x) / k.in);
  }
  dims->data[rank - 1] = static_cast<int>(k.out);
  return ctx->ResizeTensor(ctx, y, dims);  // takes `dims`
}

void activate(float* y, size_t count, uint32_t activation) {
  float lo = -INFINITY, hi = INFINITY;
  if (activation == kRelu) lo = 0.0f;
  if (activation == kRelu6) lo = 0.0f, hi = 6.0f;
  if (activation == kReluN1To1) lo = -1.0f, hi = 1.0f;
  if (activation == kNone) return;
  for (size_t i = 0; i < count; i++) {  // plain compares vectorize (fmin/fmax would be libm calls)
    const float v = y[i] < lo ? lo : y[i];
    y[i] = v > hi ? hi : v;
  }
}

// A fork-join pool: run(threads, n, fn, arg) calls fn(arg, i) for i in [0, n) on the caller and
// threads - 1 persistent workers (created on first need, never torn down: the process ends them).
class Pool {
 public:
  void run(size_t threads, size_t n, void (*fn)(void*, size_t), void* arg) {
    if (threads <= 1 || n <= 1) {
      for (size_t i = 0; i < n; i++) fn(arg, i);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mutex_);  // interpreters on several threads take turns
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (workers_ < threads - 1) {
        std::thread([this, index = workers_] { loop(index); }).detach();
        workers_++;
      }
      fn_ = fn, arg_ = arg, n_ = n, wanted_ = threads - 1, busy_ = threads - 1;
      next_.store(0);
      generation_++;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void work() {
    for (size_t i; (i = next_.fetch_add(1)) < n_;) fn_(arg_, i);
  }
  void loop(size_t index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= wanted_) continue;  // a smaller job than the pool
      lock.unlock();
      work();
      lock.lock();
      if (--busy_ == 0) done_.notify_one();
    }
  }
  std::mutex job_mutex_, mutex_;
  std::condition_variable wake_, done_;
  size_t workers_ = 0, wanted_ = 0, busy_ = 0, n_ = 0;
  uint64_t generation_ = 0;
  std::atomic<size_t> next_{0};
  void (*fn_)(void*, size_t) = nullptr;
  void* arg_ = nullptr;
};

Pool& pool() {
  static Pool* instance = new Pool;  // never destroyed: its detached workers outlive static destructors
  return *instance;
}

// One invoke's work cut into pieces: by rows (pixels, tokens) when there are enough, each piece
// running the whole weight on its rows; else by output row blocks (BCSR) / output channels (N:M).
struct Job {
  const Kernel* k;
  const Weights* w;
  const float* x;
  float* y;
  size_t rows, units, pieces;
  bool by_rows;
};

void run_piece(void* data, size_t i) {
  const Job& j = *static_cast<const Job*>(data);
  const size_t u0 = j.units * i / j.pieces, u1 = j.units * (i + 1) / j.pieces;
  const Kernel& k = *j.k;
  if (j.by_rows) {  // units are groups of 4 rows: the kernels' row tile, so every row takes the
    // same code path (and gives the same bits) as in one call over all rows
    const size_t r0 = 4 * u0, r1 = std::min(j.rows, 4 * u1);
    const float* x = j.x + r0 * k.in;
    float* y = j.y + r0 * k.out;
    if (k.kind == kBcsr)
      es_f32_bcsr_linear(&j.w->bcsr, r1 - r0, x, y);
    else
      es_f32_nm_linear(&j.w->nm, r1 - r0, x, y);
  } else if (k.kind == kBcsr) {
    es_f32_bcsr_linear_blocks(&j.w->bcsr, j.rows, j.x, j.y, u0, u1);
  } else {
    es_f32_nm_linear_outs(&j.w->nm, j.rows, j.x, j.y, u0, u1);
  }
}

TfLiteStatus invoke(TfLiteContext* ctx, TfLiteNode* node) {
  const Kernel& k = *static_cast<Kernel*>(node->user_data);
  Weights w;
  if (weights(ctx, node, k, &w, false) != kTfLiteOk) return kTfLiteError;
  const TfLiteTensor* x = tensor(ctx, node, 0);
  TfLiteTensor* y = &ctx->tensors[node->outputs->data[0]];
  const size_t rows = numel(x) / k.in;
  if (!x->data || !y->data || numel(y) != rows * k.out) return fail(ctx, k, "tensors not allocated to the prepared shapes");
  float* out = static_cast<float*>(y->data);
  const float* in = static_cast<const float*>(x->data);
  // NHWC pixels are rows: the linear kernel. (Transposing each image to channel-major for the
  // 1x1-conv kernel, which vectorizes over pixels, measured slower except at 7x7.)
  const size_t threads = static_cast<size_t>(std::max(1, ctx->recommended_num_threads));
  const size_t nonzeros = k.kind == kBcsr ? static_cast<size_t>(w.bcsr.row_ptr[es_bcsr_row_blocks(&w.bcsr)]) * k.a * k.b
                                          : static_cast<size_t>(k.out) * (k.in / k.b) * k.a;
  const bool by_rows = rows >= 4 * threads;
  const size_t units = by_rows ? (rows + 3) / 4 : k.kind == kBcsr ? es_bcsr_row_blocks(&w.bcsr) : k.out;
  // at least ~16k multiply-adds per piece, a few pieces per thread for balance
  const size_t pieces = std::max<size_t>(1, std::min({units, nonzeros * rows / 16384, 4 * threads}));
  Job job{&k, &w, in, out, rows, units, pieces, by_rows};
  pool().run(std::min(threads, pieces), pieces, run_piece, &job);
  activate(out, rows * k.out, k.activation);
  return kTfLiteOk;
}

TfLiteRegistration registration(void* (*init_fn)(TfLiteContext*, const char*, size_t)) {
  TfLiteRegistration r{};
  r.init = init_fn;
  r.free = free_op;
  r.prepare = prepare;
  r.invoke = invoke;
  return r;
}

struct Op {
  const char* name;
  TfLiteRegistration registration;
};

const Op kOps[] = {
    {"EdgesparseBcsrLinear", registration(init_op<kBcsr, false>)},
    {"EdgesparseBcsrConv1x1", registration(init_op<kBcsr, true>)},
    {"EdgesparseNmLinear", registration(init_op<kNm, false>)},
    {"EdgesparseNmConv1x1", registration(init_op<kNm, true>)},
};

// ---- finding MutableOpResolver::AddCustom ----------------------------------------------------

std::string g_status = "not looked up yet";
EdgesparseAddCustomFn g_add_custom = nullptr;

struct Candidate {
  std::string path;
  ElfW(Addr) base;
};

// Loaded objects that may hold TFLite's resolver: the LiteRT / TFLite libraries by file name
// (scanning every loaded library's symbol table, torch's included, would cost seconds).
int collect(struct dl_phdr_info* info, size_t, void* data) {
  const std::string path = info->dlpi_name ? info->dlpi_name : "";
  const std::string file = path.substr(path.find_last_of('/') + 1);
  if (file.find("litert") != std::string::npos || file.find("tflite") != std::string::npos ||
      file.find("tensorflowlite") != std::string::npos || file.find("LiteRt") != std::string::npos)
    static_cast<std::vector<Candidate>*>(data)->push_back({path, info->dlpi_addr});
  return 0;
}

// The address of `name` (a defined function) from the file's .symtab, or 0.
ElfW(Addr) symtab_lookup(const std::string& path, const char* name) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  struct stat st;
  ElfW(Addr) found = 0;
  if (fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= sizeof(ElfW(Ehdr))) {
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const auto* bytes = static_cast<const unsigned char*>(map);
      const size_t size = st.st_size;
      const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(bytes);
      const bool sane = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_shentsize == sizeof(ElfW(Shdr)) &&
                        eh->e_shoff + static_cast<size_t>(eh->e_shnum) * sizeof(ElfW(Shdr)) <= size;
      const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(bytes + (sane ? eh->e_shoff : 0));
      for (int s = 0; sane && !found && s < eh->e_shnum; s++) {
        const ElfW(Shdr)& sh = sections[s];
        if (sh.sh_type != SHT_SYMTAB || sh.sh_link >= eh->e_shnum || sh.sh_offset + sh.sh_size > size) continue;
        const ElfW(Shdr)& strtab = sections[sh.sh_link];
        if (strtab.sh_offset + strtab.sh_size > size) continue;
        const char* strings = reinterpret_cast<const char*>(bytes + strtab.sh_offset);
        const auto* symbols = reinterpret_cast<const ElfW(Sym)*>(bytes + sh.sh_offset);
        for (size_t i = 0; i < sh.sh_size / sizeof(ElfW(Sym)); i++) {
          const ElfW(Sym)& sym = symbols[i];
          if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || sym.st_shndx == SHN_UNDEF || sym.st_name >= strtab.sh_size) continue;
          if (std::strcmp(strings + sym.st_name, name) == 0) {
            found = sym.st_value;
            break;
          }
        }
      }
      munmap(map, st.st_size);
    }
  }
  close(fd);
  return found;
}

EdgesparseAddCustomFn find_add_custom() {
  // a TFLite build that exports it (e.g. a C++ libtensorflowlite.so) needs no search
  if (void* exported = dlsym(RTLD_DEFAULT, EDGESPARSE_TFLITE_ADD_CUSTOM_SYMBOL)) {
    g_status = "";
    return reinterpret_cast<EdgesparseAddCustomFn>(exported);
  }
  std::vector<Candidate> candidates;
  dl_iterate_phdr(collect, &candidates);
  std::string searched;
  for (const Candidate& c : candidates) {
    if (ElfW(Addr) offset = symtab_lookup(c.path, EDGESPARSE_TFLITE_ADD_CUSTOM_SYMBOL)) {
      g_status = "";
      return reinterpret_cast<EdgesparseAddCustomFn>(c.base + offset);
    }
    searched += (searched.empty() ? "" : ", ") + c.path.substr(c.path.find_last_of('/') + 1);
  }
  g_status = candidates.empty() ? "no LiteRT / TFLite library is loaded in this process (import ai_edge_litert.interpreter first)"
                                : "tflite::MutableOpResolver::AddCustom is neither exported nor in the symbol table of " + searched;
  return nullptr;
}

}  // namespace

// NULL when the resolver's AddCustom was found (the registerer will work), else why not.
extern "C" __attribute__((visibility("default"))) const char* EdgesparseTfliteStatus() {
  if (!g_add_custom) g_add_custom = find_add_custom();
  return g_add_custom ? nullptr : g_status.c_str();
}

// Called by the interpreter with its tflite::MutableOpResolver*.
extern "C" __attribute__((visibility("default"))) void EdgesparseTfliteRegisterer(void* resolver) {
  if (!g_add_custom) g_add_custom = find_add_custom();
  if (!g_add_custom) {
    std::fprintf(stderr, "edgesparse: cannot register the TFLite ops: %s\n", g_status.c_str());
    return;  // the model then fails to load with "unresolved custom op", which names the op
  }
  for (const Op& op : kOps) g_add_custom(resolver, op.name, &op.registration, 1);
}
