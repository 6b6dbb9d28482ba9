/* One table of kernels drives dispatch, tests and benchmarks: adding an ISA is one row.
 * The best row this CPU supports is chosen once, at first use, from run-time CPU features. */
#include <stdlib.h>
#include <string.h>

#include "edgesparse/kernels.h"

#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

/* every kernel computes the row blocks [b0, b1): callers split that range across threads */
typedef void (*es_kernel_fn)(const es_bcsr_f32*, size_t, const float*, float*, size_t, size_t);

/* the activation-sparse kernel computes the output columns [o0, o1) */
typedef void (*es_actsparse_fn)(const es_actsparse_f32*, float, size_t, const float*, float*, size_t, size_t);

/* the N:M kernels compute the output channels [o0, o1) */
typedef void (*es_nm_fn)(const es_nm_f32*, size_t, const float*, float*, size_t, size_t);

typedef void (*es_gated_fn)(const es_gated_mlp_f32*, float, size_t, const float*, float*, size_t, size_t);

typedef void (*es_fused_fn)(const es_bcsr_f32*, const es_epilogue_f32*, size_t, const float*, float*, size_t, size_t);

typedef void (*es_dwconv_fn)(const es_dwconv3x3_f32*, size_t, size_t, const float*, float*, float*, size_t, size_t);

typedef void (*es_qs8_fn)(const es_bcsr_qs8*, size_t, const int8_t*, const float*, float*, int32_t*, size_t, size_t);

typedef void (*es_qs8_conv_fn)(const es_bcsr_qs8*, const es_qs8_requant*, size_t, const int8_t*, int8_t*, size_t, size_t);

typedef void (*es_qs8_dwconv_fn)(const es_dwconv3x3_qs8*, const es_qs8_requant*, size_t, size_t, const int8_t*, int8_t*,
                                 int32_t*, size_t, size_t);
typedef void (*es_qs8_add_fn)(const es_qs8_add_params*, size_t, const int8_t*, const int8_t*, int8_t*);

#define ES_DECLARE(isa)                                                                                \
  void es_f32_bcsr_linear__##isa(const es_bcsr_f32*, size_t, const float*, float*, size_t, size_t); \
  void es_f32_bcsr_conv1x1_nchw__##isa(const es_bcsr_f32*, size_t, const float*, float*, size_t, size_t); \
  void es_f32_bcsr_conv1x1_nchw_fused__##isa(const es_bcsr_f32*, const es_epilogue_f32*, size_t, const float*, float*, \
                                             size_t, size_t);                                                    \
  void es_f32_dwconv3x3_nchw__##isa(const es_dwconv3x3_f32*, size_t, size_t, const float*, float*, float*, size_t, \
                                    size_t);                                                                      \
  void es_f32_actsparse_linear__##isa(const es_actsparse_f32*, float, size_t, const float*, float*, size_t, size_t); \
  void es_f32_gated_mlp_hidden__##isa(const es_gated_mlp_f32*, float, size_t, const float*, float*, size_t, size_t); \
  void es_qs8_bcsr_linear__##isa(const es_bcsr_qs8*, size_t, const int8_t*, const float*, float*, int32_t*, size_t, size_t); \
  void es_qs8_quantize_rows__##isa(size_t, size_t, const float*, int8_t*, float*);                             \
  void es_qs8_bcsr_conv1x1_nchw__##isa(const es_bcsr_qs8*, const es_qs8_requant*, size_t, const int8_t*, int8_t*, size_t, \
                                       size_t);                                                                 \
  void es_f32_nm_linear__##isa(const es_nm_f32*, size_t, const float*, float*, size_t, size_t);                  \
  void es_qs8_dwconv3x3_nchw_channels__##isa(const es_dwconv3x3_qs8*, const es_qs8_requant*, size_t, size_t,      \
                                             const int8_t*, int8_t*, int32_t*, size_t, size_t);                 \
  void es_qs8_add__##isa(const es_qs8_add_params*, size_t, const int8_t*, const int8_t*, int8_t*);               \
  void es_f32_nm_conv1x1_nchw__##isa(const es_nm_f32*, size_t, const float*, float*, size_t, size_t);

ES_DECLARE(scalar)
#if defined(__x86_64__)
ES_DECLARE(avx2)
ES_DECLARE(avx512)
void es_qs8_bcsr_linear__avx512vnni(const es_bcsr_qs8*, size_t, const int8_t*, const float*, float*, int32_t*, size_t,
                                    size_t);
void es_qs8_quantize_rows__avx512vnni(size_t, size_t, const float*, int8_t*, float*);
void es_qs8_bcsr_conv1x1_nchw__avx512vnni(const es_bcsr_qs8*, const es_qs8_requant*, size_t, const int8_t*, int8_t*,
                                          size_t, size_t);
void es_qs8_dwconv3x3_nchw_channels__avx512vnni(const es_dwconv3x3_qs8*, const es_qs8_requant*, size_t, size_t,
                                                const int8_t*, int8_t*, int32_t*, size_t, size_t);
void es_qs8_add__avx512vnni(const es_qs8_add_params*, size_t, const int8_t*, const int8_t*, int8_t*);
void es_qs8_make_tiles__avx512vnni(size_t, size_t, const int8_t*, uint8_t*);
void es_qs8_bcsr_linear_tiles__avx512vnni(const es_bcsr_qs8*, size_t, const uint8_t*, const float*, float*, int32_t*,
                                          size_t, size_t);
#elif defined(__aarch64__)
ES_DECLARE(neon)
void es_qs8_bcsr_linear__neondot(const es_bcsr_qs8*, size_t, const int8_t*, const float*, float*, int32_t*, size_t,
                                 size_t);
void es_qs8_quantize_rows__neondot(size_t, size_t, const float*, int8_t*, float*);
void es_qs8_bcsr_conv1x1_nchw__neondot(const es_bcsr_qs8*, const es_qs8_requant*, size_t, const int8_t*, int8_t*, size_t,
                                       size_t);
void es_qs8_dwconv3x3_nchw_channels__neondot(const es_dwconv3x3_qs8*, const es_qs8_requant*, size_t, size_t,
                                             const int8_t*, int8_t*, int32_t*, size_t, size_t);
void es_qs8_add__neondot(const es_qs8_add_params*, size_t, const int8_t*, const int8_t*, int8_t*);
#endif

static int es_supported(const char* isa) {
  if (!strcmp(isa, "scalar")) return 1;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!strcmp(isa, "avx512vnni"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#elif defined(__aarch64__)
  if (!strcmp(isa, "neon")) return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
  if (!strcmp(isa, "neondot")) return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
  return 0;
}

static const struct {
  const char* isa;
  es_kernel_fn linear;
  es_kernel_fn conv1x1;
  es_actsparse_fn actsparse;
  es_qs8_fn qs8_linear;
  es_nm_fn nm_linear;
  es_nm_fn nm_conv1x1;
  es_gated_fn gated_hidden;
  es_fused_fn conv1x1_fused;
  es_dwconv_fn dwconv3x3;
  void (*qs8_quantize)(size_t, size_t, const float*, int8_t*, float*);
  es_qs8_conv_fn qs8_conv1x1;
  es_qs8_dwconv_fn qs8_dwconv3x3;
  es_qs8_add_fn qs8_add;
} es_table[] = {  /* best first */
/* a row: its name, the ISA of its f32 kernels and the ISA of its int8 kernels */
#define ES_ROW(name, f32, qs8)                                                                               \
  {#name, es_f32_bcsr_linear__##f32, es_f32_bcsr_conv1x1_nchw__##f32, es_f32_actsparse_linear__##f32,          \
   es_qs8_bcsr_linear__##qs8, es_f32_nm_linear__##f32, es_f32_nm_conv1x1_nchw__##f32,                           \
   es_f32_gated_mlp_hidden__##f32, es_f32_bcsr_conv1x1_nchw_fused__##f32, es_f32_dwconv3x3_nchw__##f32,         \
   es_qs8_quantize_rows__##qs8, es_qs8_bcsr_conv1x1_nchw__##qs8, es_qs8_dwconv3x3_nchw_channels__##qs8,        \
   es_qs8_add__##qs8}
#if defined(__x86_64__)
    ES_ROW(avx512vnni, avx512, avx512vnni),
    ES_ROW(avx512, avx512, avx512),
    ES_ROW(avx2, avx2, avx2),
#elif defined(__aarch64__)
    ES_ROW(neondot, neon, neondot),
    ES_ROW(neon, neon, neon),
#endif
    ES_ROW(scalar, scalar, scalar),
};
static const size_t es_rows = sizeof(es_table) / sizeof(es_table[0]);
static int es_choice = -1;

static int es_select(void) {
  if (es_choice < 0) {
    for (size_t i = 0; i < es_rows; i++)
      if (es_supported(es_table[i].isa)) { es_choice = (int)i; break; }
  }
  return es_choice;
}

int es_force_isa(const char* name) {
  if (name == NULL) { es_choice = -1; return 0; }
  for (size_t i = 0; i < es_rows; i++)
    if (!strcmp(es_table[i].isa, name) && es_supported(name)) { es_choice = (int)i; return 0; }
  return -1;
}

const char* es_f32_bcsr_isa(void) { return es_table[es_select()].isa; }

size_t es_qs8_tiles_bytes(size_t n, size_t in) {
#if defined(__x86_64__)
  if (n >= ES_QS8_TILE_MIN_ROWS && es_table[es_select()].qs8_linear == es_qs8_bcsr_linear__avx512vnni) return (n + 15) / 16 * 16 * in;
#endif
  (void)n, (void)in;
  return 0;
}

void es_qs8_make_tiles(size_t n, size_t in, const int8_t* xq, uint8_t* tiles) {
#if defined(__x86_64__)
  es_qs8_make_tiles__avx512vnni(n, in, xq, tiles);
#else
  (void)n, (void)in, (void)xq, (void)tiles;
#endif
}

void es_qs8_quantize_rows(size_t n, size_t in, const float* x, int8_t* xq, float* x_scale) {
  es_table[es_select()].qs8_quantize(n, in, x, xq, x_scale);
}

int es_bcsr_shape_supported(size_t block_rows, size_t block_cols) {
  if (block_cols == 1) return block_rows == 1 || block_rows == 2 || block_rows == 4 || block_rows == 8;
  return block_rows == 1 && (block_cols == 2 || block_cols == 4 || block_cols == 8 || block_cols == 16);
}

const char* es_bcsr_check(size_t out, size_t in, size_t block_rows, size_t block_cols, const int32_t* row_ptr,
                          size_t row_ptr_len, size_t col_idx_len, size_t values_len) {
  if (out < 1 || in < 1) return "in_features and out_features must be positive";
  if (!es_bcsr_shape_supported(block_rows, block_cols))
    return "unsupported block shape (Rx1 with R in 1,2,4,8 or 1xC with C in 2,4,8,16)";
  if (in % block_cols) return "in_features must be a multiple of the block columns";
  const size_t blocks = (out + block_rows - 1) / block_rows;
  if (row_ptr_len != blocks + 1 || row_ptr[0] != 0) return "row_ptr must hold ceil(out / block_rows) + 1 offsets from 0";
  const int32_t nnz = row_ptr[blocks];
  if (nnz < 0 || col_idx_len < (size_t)nnz || values_len < (size_t)nnz * block_rows * block_cols)
    return "row_ptr does not match col_idx / values";
  return NULL;
}

const char* es_qs8_bcsr_check(size_t out, size_t in, size_t block_rows, const int32_t* row_ptr, size_t row_ptr_len,
                              size_t col_idx_len, size_t values_len) {
  const char* why = es_bcsr_check(out, in, block_rows, 1, row_ptr, row_ptr_len, col_idx_len, values_len);
  if (!why && row_ptr[row_ptr_len - 1] % 4) why = "int8 BCSR blocks must come in groups of four (formats.pack_qs8_bcsr)";
  return why;
}

const char* es_nm_check(size_t out, size_t in, size_t n, size_t m, size_t values_len, size_t idx_len) {
  if (out < 1 || in < 1) return "in_features and out_features must be positive";
  if (n < 1 || n >= m || m > 255) return "N:M needs 1 <= N < M <= 255";
  if (in % m) return "in_features must be a multiple of M";
  if (values_len != out * (in / m) * n || idx_len != values_len) return "values / idx must be [out, in / M * N]";
  return NULL;
}

size_t es_bcsr_row_blocks(const es_bcsr_f32* w) { return (w->out + w->block_rows - 1) / w->block_rows; }

void es_f32_bcsr_linear_blocks(const es_bcsr_f32* w, size_t n, const float* x, float* y, size_t b0, size_t b1) {
  es_table[es_select()].linear(w, n, x, y, b0, b1);
}

void es_f32_bcsr_conv1x1_nchw_blocks(const es_bcsr_f32* w, size_t pixels, const float* x, float* y, size_t b0,
                                     size_t b1) {
  es_table[es_select()].conv1x1(w, pixels, x, y, b0, b1);
}

void es_f32_bcsr_conv1x1_nchw_fused_blocks(const es_bcsr_f32* w, const es_epilogue_f32* e, size_t pixels,
                                           const float* x, float* y, size_t b0, size_t b1) {
  es_table[es_select()].conv1x1_fused(w, e, pixels, x, y, b0, b1);
}

size_t es_dwconv3x3_out_size(size_t in, size_t stride) { return (in - 1) / stride + 1; }

/* the layouts f32-dwconv.inc uses: the padded plane, then (stride 1) the output with its junk
 * columns or (stride 2) every padded row split into even and odd columns, with room for whole vectors;
 * or, for small output planes, a block of channels transposed (input, 9 taps + bias, output) */
size_t es_f32_dwconv3x3_scratch(size_t height, size_t width, size_t stride) {
  const size_t oh = es_dwconv3x3_out_size(height, stride), ow = es_dwconv3x3_out_size(width, stride);
  const size_t rest = stride == 1 ? oh * (width + 2) + ES_DW_SLACK : 2 * (height + 2) * (ow + 1 + 2 * ES_DW_SLACK);
  const size_t padded = (height + 2) * (width + 2) + ES_DW_SLACK + rest;
  const size_t small = (height * width + 10 + oh * ow) * ES_DW_CHANNEL_BLOCK;
  return padded > small ? padded : small;
}

void es_f32_dwconv3x3_nchw_channels(const es_dwconv3x3_f32* w, size_t height, size_t width, const float* x, float* y,
                                    float* scratch, size_t c0, size_t c1) {
  es_table[es_select()].dwconv3x3(w, height, width, x, y, scratch, c0, c1);
}

void es_f32_bcsr_linear(const es_bcsr_f32* w, size_t n, const float* x, float* y) {
  es_f32_bcsr_linear_blocks(w, n, x, y, 0, es_bcsr_row_blocks(w));
}

void es_f32_bcsr_conv1x1_nchw(const es_bcsr_f32* w, size_t pixels, const float* x, float* y) {
  es_f32_bcsr_conv1x1_nchw_blocks(w, pixels, x, y, 0, es_bcsr_row_blocks(w));
}

void es_f32_nm_linear_outs(const es_nm_f32* w, size_t rows, const float* x, float* y, size_t o0, size_t o1) {
  es_table[es_select()].nm_linear(w, rows, x, y, o0, o1);
}

void es_f32_nm_linear(const es_nm_f32* w, size_t rows, const float* x, float* y) {
  es_f32_nm_linear_outs(w, rows, x, y, 0, w->out);
}

void es_f32_nm_conv1x1_nchw_outs(const es_nm_f32* w, size_t pixels, const float* x, float* y, size_t o0, size_t o1) {
  es_table[es_select()].nm_conv1x1(w, pixels, x, y, o0, o1);
}

void es_f32_nm_conv1x1_nchw(const es_nm_f32* w, size_t pixels, const float* x, float* y) {
  es_f32_nm_conv1x1_nchw_outs(w, pixels, x, y, 0, w->out);
}

void es_f32_actsparse_linear_cols(const es_actsparse_f32* w, float threshold, size_t n, const float* x, float* y,
                                  size_t o0, size_t o1) {
  es_table[es_select()].actsparse(w, threshold, n, x, y, o0, o1);
}

void es_f32_actsparse_linear(const es_actsparse_f32* w, float threshold, size_t n, const float* x, float* y) {
  es_f32_actsparse_linear_cols(w, threshold, n, x, y, 0, w->out);
}

void es_f32_gated_mlp_hidden(const es_gated_mlp_f32* w, float threshold, size_t n, const float* x, float* h,
                             size_t i0, size_t i1) {
  es_table[es_select()].gated_hidden(w, threshold, n, x, h, i0, i1);
}

es_actsparse_f32 es_gated_mlp_down(const es_gated_mlp_f32* w) {
  es_actsparse_f32 down = {w->out, w->hidden, w->bundle + w->in, w->down_bias, w->in + w->out};
  return down;
}

void es_f32_gated_mlp(const es_gated_mlp_f32* w, float threshold, size_t n, const float* x, float* h, float* y) {
  es_f32_gated_mlp_hidden(w, threshold, n, x, h, 0, w->hidden);
  const es_actsparse_f32 down = es_gated_mlp_down(w);
  es_f32_actsparse_linear(&down, 0.0f, n, h, y);
}

void es_qs8_bcsr_linear_blocks(const es_bcsr_qs8* w, size_t n, const int8_t* xq, const uint8_t* tiles,
                               const float* x_scale, float* y, int32_t* acc, size_t b0, size_t b1) {
#if defined(__x86_64__)
  if (tiles) {
    es_qs8_bcsr_linear_tiles__avx512vnni(w, n, tiles, x_scale, y, acc, b0, b1);
    return;
  }
#endif
  es_table[es_select()].qs8_linear(w, n, xq, x_scale, y, acc, b0, b1);
}

void es_qs8_bcsr_conv1x1_nchw(const es_bcsr_qs8* w, const es_qs8_requant* q, size_t pixels, const int8_t* x, int8_t* y,
                              size_t b0, size_t b1) {
  es_table[es_select()].qs8_conv1x1(w, q, pixels, x, y, b0, b1);
}

/* qs8-chain.inc: the int8 padded plane, its even and odd columns (stride 2), each with
 * ES_DW_QS8_SLACK bytes of slack, and the flattened output plane; or, for small output planes, the input pixel-major with
 * 16 channels per pixel and a pad row (int32) */
size_t es_qs8_dwconv3x3_scratch(size_t height, size_t width, size_t stride) {
  const size_t pw = width + 2, half = (pw + 1) / 2, opitch = stride == 1 ? pw : 2 * half;
  const size_t n = (es_dwconv3x3_out_size(height, stride) - 1) * opitch + es_dwconv3x3_out_size(width, stride);
  const size_t bytes = (height + 2) * (pw + 2 * half) + 3 * ES_DW_QS8_SLACK + (n + 63) / 64 * 64;
  const size_t small = (height * width + 1) * 16;
  return (bytes + 3) / 4 > small ? (bytes + 3) / 4 : small;
}

void es_qs8_dwconv3x3_nchw_channels(const es_dwconv3x3_qs8* w, const es_qs8_requant* q, size_t height, size_t width,
                                    const int8_t* x, int8_t* y, int32_t* scratch, size_t c0, size_t c1) {
  es_table[es_select()].qs8_dwconv3x3(w, q, height, width, x, y, scratch, c0, c1);
}

void es_qs8_add(const es_qs8_add_params* p, size_t n, const int8_t* a, const int8_t* b, int8_t* y) {
  es_table[es_select()].qs8_add(p, n, a, b, y);
}

int es_qs8_bcsr_linear(const es_bcsr_qs8* w, size_t n, const float* x, float* y) {
  int8_t* xq = malloc(n * w->in + 1);
  float* x_scale = malloc((n + 1) * sizeof(float));
  if (!xq || !x_scale) {
    free(xq);
    free(x_scale);
    return -1;
  }
  es_qs8_quantize_rows(n, w->in, x, xq, x_scale);
  const size_t tile_bytes = es_qs8_tiles_bytes(n, w->in);
  uint8_t* tiles = tile_bytes ? malloc(tile_bytes) : NULL; /* out of memory: the row kernel */
  if (tiles) es_qs8_make_tiles(n, w->in, xq, tiles);
  es_qs8_bcsr_linear_blocks(w, n, xq, tiles, x_scale, y, NULL, 0, (w->out + w->block_rows - 1) / w->block_rows);
  free(tiles);
  free(xq);
  free(x_scale);
  return 0;
}

/* ---- activation sparsity on int8 weights (src/qs8-actsparse): its own table, rows named like
 * es_table's so es_force_isa / automatic dispatch pick the same ISA (an ISA without a row here,
 * e.g. avx512vnni, uses the best row below it). */
typedef void (*es_qc8w_actsparse_fn)(const es_actsparse_qc8w*, float, size_t, const float*, float*, size_t, size_t);
typedef void (*es_qs8_actsparse_fn)(const es_actsparse_qc8w*, float, size_t, const float*, const int8_t*, const float*,
                                    float*, size_t, size_t);
typedef void (*es_qc8w_gated_fn)(const es_gated_mlp_qc8w*, float, size_t, const float*, float*, size_t, size_t);

#define ES_QA_DECLARE(isa)                                                                                         \
  void es_f32_qc8w_actsparse_linear__##isa(const es_actsparse_qc8w*, float, size_t, const float*, float*, size_t, \
                                           size_t);                                                               \
  void es_qs8_actsparse_linear__##isa(const es_actsparse_qc8w*, float, size_t, const float*, const int8_t*,       \
                                      const float*, float*, size_t, size_t);                                      \
  void es_f32_qc8w_gated_mlp_hidden__##isa(const es_gated_mlp_qc8w*, float, size_t, const float*, float*, size_t, \
                                           size_t);

ES_QA_DECLARE(scalar)
#if defined(__x86_64__)
ES_QA_DECLARE(avx2)
ES_QA_DECLARE(avx512)
#elif defined(__aarch64__)
ES_QA_DECLARE(neon)
#endif

static const struct {
  const char* isa;
  es_qc8w_actsparse_fn f32_linear;
  es_qs8_actsparse_fn qs8_linear;
  es_qc8w_gated_fn gated_hidden;
} es_qa_table[] = {  /* best first */
#define ES_QA_ROW(name) \
  {#name, es_f32_qc8w_actsparse_linear__##name, es_qs8_actsparse_linear__##name, es_f32_qc8w_gated_mlp_hidden__##name}
#if defined(__x86_64__)
    ES_QA_ROW(avx512),
    ES_QA_ROW(avx2),
#elif defined(__aarch64__)
    ES_QA_ROW(neon),
#endif
    ES_QA_ROW(scalar),
};

/* the row for es_table's choice: the same name, else the first row at or below it */
static size_t es_qa_select(void) {
  const int choice = es_select();
  for (size_t r = (size_t)choice; r < es_rows; r++)
    for (size_t i = 0; i < sizeof(es_qa_table) / sizeof(es_qa_table[0]); i++)
      if (!strcmp(es_qa_table[i].isa, es_table[r].isa)) return i;
  return sizeof(es_qa_table) / sizeof(es_qa_table[0]) - 1;
}

void es_f32_qc8w_actsparse_linear_cols(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x, float* y,
                                       size_t o0, size_t o1) {
  es_qa_table[es_qa_select()].f32_linear(w, threshold, n, x, y, o0, o1);
}

void es_qs8_actsparse_linear_cols(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x,
                                  const int8_t* xq, const float* x_scale, float* y, size_t o0, size_t o1) {
  es_qa_table[es_qa_select()].qs8_linear(w, threshold, n, x, xq, x_scale, y, o0, o1);
}

void es_f32_qc8w_gated_mlp_hidden(const es_gated_mlp_qc8w* w, float threshold, size_t n, const float* x, float* h,
                                  size_t i0, size_t i1) {
  es_qa_table[es_qa_select()].gated_hidden(w, threshold, n, x, h, i0, i1);
}

es_actsparse_qc8w es_gated_mlp_qc8w_down(const es_gated_mlp_qc8w* w) {
  es_actsparse_qc8w down = {w->out, w->hidden, w->bundle + w->in, w->down_scales, w->down_bias, w->in + w->out};
  return down;
}

void es_f32_qc8w_gated_mlp(const es_gated_mlp_qc8w* w, float threshold, size_t n, const float* x, float* h, float* y) {
  es_f32_qc8w_gated_mlp_hidden(w, threshold, n, x, h, 0, w->hidden);
  const es_actsparse_qc8w down = es_gated_mlp_qc8w_down(w);
  es_f32_qc8w_actsparse_linear_cols(&down, 0.0f, n, h, y, 0, w->out);
}
