/* edgesparse sparse CPU kernels: the plain C ABI (tests, benchmarks, runtime op wrappers).
 *
 * Weight format "BCSR RxC": the weight [out, in] is cut into blocks of R consecutive output
 * channels by C consecutive input columns; only nonzero blocks are stored. Supported shapes:
 * Rx1 with R in {1, 2, 4, 8} (R output channels share one input column: vectorizes over outputs)
 * and 1xC with C in {2, 4, 8, 16} (one output channel, C adjacent inputs: vectorizes over inputs;
 * needs in % C == 0). R = C = 1 is plain CSR.
 *   row_ptr[b] .. row_ptr[b+1]  the nonzero blocks of row block b   (int32, ceil(out/R) + 1)
 *   col_idx[k]                  first input column of block k       (int32, nnz_blocks)
 *   values[(k*R + r)*C + j]     weight[b*R + r, col_idx[k] + j]     (float, nnz_blocks * R * C)
 * A ragged last row block is zero-padded in `values`; only rows < out are written.
 *
 * Weight format "N:M": every group of M consecutive inputs of an output row keeps N weights.
 *   values[o, g*N + j]  the j-th kept weight of group g        (float, out * in/M * N)
 *   idx[o, g*N + j]     its position inside the group, 0..M-1  (uint8, same shape)
 */
#ifndef EDGESPARSE_KERNELS_H
#define EDGESPARSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  size_t out;             /* output channels */
  size_t in;              /* input channels */
  size_t block_rows;      /* R */
  size_t block_cols;      /* C */
  const float* values;
  const int32_t* col_idx;
  const int32_t* row_ptr;
  const float* bias;      /* [out] or NULL */
} es_bcsr_f32;

/* Linear, rows of x are independent: y[n, :] = W x[n, :] + bias, x [n, in], y [n, out]. */
void es_f32_bcsr_linear(const es_bcsr_f32* w, size_t n, const float* x, float* y);

/* 1x1 convolution in NCHW for one image: y[o, p] = sum_i W[o, i] x[i, p] + bias[o],
 * x [in, pixels], y [out, pixels]. Vectorized over pixels. */
void es_f32_bcsr_conv1x1_nchw(const es_bcsr_f32* w, size_t pixels, const float* x, float* y);

/* The same, for row blocks [b0, b1) only (b1 <= es_bcsr_row_blocks(w)): disjoint ranges write
 * disjoint outputs, so callers can split the range across threads. */
size_t es_bcsr_row_blocks(const es_bcsr_f32* w);
void es_f32_bcsr_linear_blocks(const es_bcsr_f32* w, size_t n, const float* x, float* y, size_t b0, size_t b1);
void es_f32_bcsr_conv1x1_nchw_blocks(const es_bcsr_f32* w, size_t pixels, const float* x, float* y, size_t b0,
                                     size_t b1);

/* A 1x1 conv with its consumers fused, so a chain of layers stays on these kernels (no trip
 * through another runtime's layout): y = clamp(W x + bias + residual, min, max), where residual
 * is [out, pixels] (the tensor a skip connection adds) or NULL, and min/max are +-INFINITY when
 * there is no activation (ReLU: 0, INFINITY; ReLU6: 0, 6). */
typedef struct {
  const float* residual;  /* [out, pixels] or NULL */
  float min, max;
} es_epilogue_f32;

void es_f32_bcsr_conv1x1_nchw_fused_blocks(const es_bcsr_f32* w, const es_epilogue_f32* e, size_t pixels,
                                           const float* x, float* y, size_t b0, size_t b1);

/* Depthwise 3x3 convolution in NCHW, padding 1, stride 1 or 2, bias and clamp fused:
 *   y[c, oy, ox] = clamp(bias[c] + sum_{ky,kx} weights[c, ky, kx] x[c, oy*s + ky - 1, ox*s + kx - 1])
 * (x outside the image is 0), for one image, channels [c0, c1) (threads split that range).
 * x [channels, height, width], y [channels, out_h, out_w] with out = (in - 1) / stride + 1.
 * The SIMD variants zero-pad each channel into `scratch` (es_f32_dwconv3x3_scratch floats, one
 * buffer per thread) so every tap is a contiguous vector load, over the whole plane at once:
 * that keeps the lanes full on the small planes of the last layers. */
typedef struct {
  size_t channels;
  size_t stride;          /* 1 or 2 */
  const float* weights;   /* [channels, 3, 3] */
  const float* bias;      /* [channels] or NULL */
  float min, max;         /* the fused activation's clamp */
} es_dwconv3x3_f32;

/* floats of room the SIMD variants leave past each scratch plane (whole-vector loads at the end) */
#define ES_DW_SLACK 32
/* output planes of at most this many pixels are computed across channels, this many at a time */
#define ES_DW_SMALL_PLANE 16
#define ES_DW_CHANNEL_BLOCK 64

size_t es_dwconv3x3_out_size(size_t in, size_t stride);
size_t es_f32_dwconv3x3_scratch(size_t height, size_t width, size_t stride);
void es_f32_dwconv3x3_nchw_channels(const es_dwconv3x3_f32* w, size_t height, size_t width, const float* x, float* y,
                                    float* scratch, size_t c0, size_t c1);

/* 1 if the kernels run blocks of R x C (see the format above), else 0. */
int es_bcsr_shape_supported(size_t block_rows, size_t block_cols);

/* Operand checks for the op wrappers, O(1): NULL when the sizes are consistent, else a message.
 * Column indices are trusted (they come from the packer) and are not scanned per call. */
const char* es_bcsr_check(size_t out, size_t in, size_t block_rows, size_t block_cols, const int32_t* row_ptr,
                          size_t row_ptr_len, size_t col_idx_len, size_t values_len);
const char* es_nm_check(size_t out, size_t in, size_t n, size_t m, size_t values_len, size_t idx_len);
/* es_bcsr_check for int8 BCSR Rx1 (es_bcsr_qs8): blocks come in groups of four */
const char* es_qs8_bcsr_check(size_t out, size_t in, size_t block_rows, const int32_t* row_ptr, size_t row_ptr_len,
                              size_t col_idx_len, size_t values_len);

/* N:M linear and 1x1 conv (NCHW), for output channels [o0, o1) (threads split that range). */
typedef struct {
  size_t out;
  size_t in;              /* a multiple of m */
  size_t n, m;            /* keep n of every m inputs, 1 <= n < m <= 255 */
  const float* values;    /* [out, in / m * n] */
  const uint8_t* idx;     /* [out, in / m * n], each < m */
  const float* bias;      /* [out] or NULL */
} es_nm_f32;

void es_f32_nm_linear(const es_nm_f32* w, size_t rows, const float* x, float* y);
void es_f32_nm_linear_outs(const es_nm_f32* w, size_t rows, const float* x, float* y, size_t o0, size_t o1);
void es_f32_nm_conv1x1_nchw(const es_nm_f32* w, size_t pixels, const float* x, float* y);
void es_f32_nm_conv1x1_nchw_outs(const es_nm_f32* w, size_t pixels, const float* x, float* y, size_t o0, size_t o1);

/* Activation-sparse linear (TEAL / CATS style): weights input-channel-major, weight_t[in][out],
 * so an input channel with |x| <= threshold skips one contiguous row of weights:
 *   y[n, o] = sum over c with |x[n, c]| > threshold of x[n, c] * weight_t[c, o]  + bias[o]
 * threshold 0 skips exact zeros (e.g. after ReLU) and is otherwise exact. Batch 1 (decode) is
 * the case it is built for: every row re-reads its active weight rows. */
typedef struct {
  size_t out;
  size_t in;
  const float* weight_t;  /* [in, out]: row c at weight_t + c * stride */
  const float* bias;      /* [out] or NULL */
  size_t stride;          /* floats between weight rows; 0 means out */
} es_actsparse_f32;

void es_f32_actsparse_linear(const es_actsparse_f32* w, float threshold, size_t n, const float* x, float* y);
/* output columns [o0, o1) only: disjoint ranges write disjoint outputs (threads split them) */
void es_f32_actsparse_linear_cols(const es_actsparse_f32* w, float threshold, size_t n, const float* x, float* y,
                                  size_t o0, size_t o1);

/* Activation-sparse gated MLP (CATS on LLaMA-style SwiGLU), with gate/up/down bundled per neuron:
 *   a = act(gate x + gate_bias)       dense (an input-major GEMV): the gate decides which neurons live
 *   h_i = |a_i| > threshold_i ? a_i * (up_i x + up_bias_i) : 0   (threshold_i: thresholds[i] or the scalar)
 *   y = down h + down_bias            only the live neurons' columns are read
 * bundle row i = [up row i (in floats) | down column i (out floats)], so a live neuron's up and
 * down weights are one contiguous stream and a dead one costs nothing past its gate row.
 * Two phases, each split-able across threads: es_f32_gated_mlp_hidden fills h for neurons
 * [i0, i1); the down projection is es_f32_actsparse_linear_cols on es_gated_mlp_down(w) with
 * threshold 0 (dead neurons have h exactly 0). */
enum { ES_ACT_SILU = 0, ES_ACT_RELU = 1 };
typedef struct {
  size_t in, hidden, out;
  const float* gate;       /* [in, hidden]: input-major, row c = input c's weight for every neuron */
  const float* bundle;     /* [hidden, in + out] */
  const float* gate_bias;  /* [hidden] or NULL */
  const float* up_bias;    /* [hidden] or NULL */
  const float* down_bias;  /* [out] or NULL */
  int act;                 /* ES_ACT_SILU or ES_ACT_RELU */
  const float* thresholds; /* [hidden] one threshold per neuron (CHESS), or NULL: the scalar one */
} es_gated_mlp_f32;

void es_f32_gated_mlp_hidden(const es_gated_mlp_f32* w, float threshold, size_t n, const float* x, float* h,
                             size_t i0, size_t i1);
es_actsparse_f32 es_gated_mlp_down(const es_gated_mlp_f32* w);
/* both phases, one thread; h is scratch [n, hidden] */
void es_f32_gated_mlp(const es_gated_mlp_f32* w, float threshold, size_t n, const float* x, float* h, float* y);

/* int8 BCSR Rx1 linear (weights int8 with per-output-channel scales, activations int8 with a
 * per-row dynamic scale, int32 accumulation). Blocks as in es_bcsr_f32 (C = 1), but in groups of
 * four so a dot-product instruction (VNNI vpdpbusd, NEON sdot) does four blocks at once: every row
 * block holds a multiple of 4 blocks (padding blocks: zero weights, any valid column), and the
 * group starting at block k (k a multiple of 4) stores row r's four weights together:
 *   values[k*R + r*4 + j] = weight[b*R + r, col_idx[k + j]]          j = 0..3
 *   y[n, o] = (sum_k values * xq) * scales[o] * x_scale[n] + bias[o]
 * Activations are quantized symmetrically per row: x_scale = max|x| / 127 (1 for an all-zero
 * row), xq = clamp(round_half_even(x * (1 / x_scale)), -127, 127). */
typedef struct {
  size_t out;
  size_t in;
  size_t block_rows;      /* R in {1, 2, 4, 8} */
  const int8_t* values;   /* nnz_blocks * R */
  const int32_t* col_idx;
  const int32_t* row_ptr;
  const float* scales;    /* [out]: weight = values * scales[o] */
  const float* bias;      /* [out] or NULL */
} es_bcsr_qs8;

void es_qs8_quantize_rows(size_t n, size_t in, const float* x, int8_t* xq, float* x_scale);
/* Many input rows: where this CPU has a kernel that puts the rows in the vector lanes (AVX-512
 * VNNI, n >= ES_QS8_TILE_MIN_ROWS), es_qs8_tiles_bytes is > 0 and that kernel reads xq transposed
 * into tiles of 16 rows (es_qs8_make_tiles into a buffer of that size, once per call: every piece
 * of the call shares them). 0: no tiles, the row kernel reads xq. */
#define ES_QS8_TILE_MIN_ROWS 8
size_t es_qs8_tiles_bytes(size_t n, size_t in);
void es_qs8_make_tiles(size_t n, size_t in, const int8_t* xq, uint8_t* tiles);
/* row blocks [b0, b1) from pre-quantized rows (and their tiles, or NULL); acc != NULL writes the
 * int32 sums instead of y */
void es_qs8_bcsr_linear_blocks(const es_bcsr_qs8* w, size_t n, const int8_t* xq, const uint8_t* tiles,
                               const float* x_scale, float* y, int32_t* acc, size_t b0, size_t b1);
/* quantize x [n, in] and run every row block; returns -1 if out of memory */
int es_qs8_bcsr_linear(const es_bcsr_qs8* w, size_t n, const float* x, float* y);

/* Static int8 1x1 conv on quantized NCHW tensors (XNNPACK's QS8 convolution semantics): one image,
 * x int8 [in, pixels], y int8 [out, pixels], weights as es_bcsr_qs8 (scales and bias unused):
 *   acc[o, p] = sum_c weight[o, c] * x[c, p] + bias[o]                          (int32)
 *   y[o, p]   = clamp(nearbyint((float)acc * mult[o]) + y_zp, y_min, y_max)
 * The input's zero point is folded into the bias (bias = int32 bias - x_zp * sum_c weight[o, c]);
 * mult[o] = x_scale * weight_scale[o] / y_scale (fp32); a fused ReLU / ReLU6 is the clamp.
 * AVX-512 VNNI puts 16 pixels in the vector lanes (an NCHW row is already pixel-major: no
 * transpose); the other ISAs take 4 pixels at a time. Row blocks [b0, b1). */
typedef struct {
  int32_t y_zp, y_min, y_max;
  const float* mult;    /* [out] */
  const int32_t* bias;  /* [out] or NULL */
} es_qs8_requant;
void es_qs8_bcsr_conv1x1_nchw(const es_bcsr_qs8* w, const es_qs8_requant* q, size_t pixels, const int8_t* x, int8_t* y,
                              size_t b0, size_t b1);
/* one output from its fp32 value: the clamp first (its bounds are integers, so the order does not
 * matter, and a huge value cannot overflow the conversion), then round half to even, as
 * XNNPACK's fp32 requantization */
static inline int8_t es_qs8_store(float v, const es_qs8_requant* q) {
  const float lo = (float)(q->y_min - q->y_zp), hi = (float)(q->y_max - q->y_zp);
  v = v < lo ? lo : (v > hi ? hi : v);
  return (int8_t)((int32_t)__builtin_nearbyintf(v) + q->y_zp);
}
static inline int8_t es_qs8_requantize(int32_t acc, float mult, const es_qs8_requant* q) {
  return es_qs8_store((float)acc * mult, q);
}

/* Static int8 layers between our sparse 1x1 convs (family qs8-chain), NCHW, quantized in and out:
 * depthwise 3x3 (padding 1 with the input zero point, stride 1 or 2; weights int8 [channels, 9],
 * q->mult / q->bias per channel, bias not folded: padding makes the zero point's share vary) over
 * channels [c0, c1), scratch of es_qs8_dwconv3x3_scratch int32 per thread; and the add
 *   y = clamp(nearbyint((a - a_zp) * a_mult + (b - b_zp) * b_mult) + y_zp, y_min, y_max)
 * with a_mult = a_scale / y_scale, b_mult = b_scale / y_scale (fp32). */
typedef struct {
  size_t channels;
  size_t stride;          /* 1 or 2 */
  const int8_t* weights;  /* [channels, 3, 3] */
  int32_t x_zp;
} es_dwconv3x3_qs8;
#define ES_DW_QS8_SLACK 64 /* bytes of room qs8-chain leaves past each plane (whole 64-byte loads) */
size_t es_qs8_dwconv3x3_scratch(size_t height, size_t width, size_t stride);
void es_qs8_dwconv3x3_nchw_channels(const es_dwconv3x3_qs8* w, const es_qs8_requant* q, size_t height, size_t width,
                                    const int8_t* x, int8_t* y, int32_t* scratch, size_t c0, size_t c1);
typedef struct {
  int32_t a_zp, b_zp;
  float a_mult, b_mult;
  es_qs8_requant out;     /* y_zp, y_min, y_max (mult and bias unused) */
} es_qs8_add_params;
void es_qs8_add(const es_qs8_add_params* p, size_t n, const int8_t* a, const int8_t* b, int8_t* y);

/* Activation sparsity on int8 weights (family qs8-actsparse): the layouts above with int8 values
 * and per-output-channel fp32 scales (symmetric: weight = q * scale), so a skipped input row
 * saves a quarter of the fp32 bytes. Two flavours of the linear, both skipping the rows of inputs
 * with |x| <= threshold:
 *   es_f32_qc8w_actsparse_linear   fp32 x times int8 rows converted on the fly (fp32 sums)
 *       y[n, o] = scales[o] * sum_{|x[n,c]| > t} x[n, c] * weight_t[c, o] + bias[o]
 *   es_qs8_actsparse_linear        x quantized per row (es_qs8_quantize_rows: xq, x_scale), int32 sums
 *       y[n, o] = scales[o] * x_scale[n] * sum_{|x[n,c]| > t} xq[n, c] * weight_t[c, o] + bias[o]
 *     (bit-exact against the integer reference; x picks the live inputs, xq is what is summed) */
typedef struct {
  size_t out;
  size_t in;
  const int8_t* weight_t; /* [in, out]: row c at weight_t + c * stride */
  const float* scales;    /* [out] */
  const float* bias;      /* [out] or NULL */
  size_t stride;          /* bytes between weight rows; 0 means out */
} es_actsparse_qc8w;

void es_f32_qc8w_actsparse_linear_cols(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x, float* y,
                                       size_t o0, size_t o1);
void es_qs8_actsparse_linear_cols(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x,
                                  const int8_t* xq, const float* x_scale, float* y, size_t o0, size_t o1);

/* The gated MLP (CATS / CHESS) on int8 weights, fp32 activations: es_gated_mlp_f32's layout with
 * int8 gate_t [in, hidden] (per-neuron gate_scales), int8 bundle rows [up row | down column] with
 * per-neuron up_scales and per-output down_scales:
 *   a_i = act(gate_scales[i] * (x . gate_t[:, i]) + gate_bias[i])
 *   h_i = |a_i| > threshold_i ? a_i * (up_scales[i] * (x . bundle[i, :in]) + up_bias[i]) : 0
 *   y   = es_f32_qc8w_actsparse_linear on es_gated_mlp_qc8w_down(w) with threshold 0 */
typedef struct {
  size_t in, hidden, out;
  const int8_t* gate_t;      /* [in, hidden] */
  const float* gate_scales;  /* [hidden] */
  const int8_t* bundle;      /* [hidden, in + out] */
  const float* up_scales;    /* [hidden] */
  const float* down_scales;  /* [out] */
  const float* gate_bias;    /* [hidden] or NULL */
  const float* up_bias;      /* [hidden] or NULL */
  const float* down_bias;    /* [out] or NULL */
  int act;                   /* ES_ACT_SILU or ES_ACT_RELU */
  const float* thresholds;   /* [hidden] or NULL: the scalar one */
} es_gated_mlp_qc8w;

void es_f32_qc8w_gated_mlp_hidden(const es_gated_mlp_qc8w* w, float threshold, size_t n, const float* x, float* h,
                                  size_t i0, size_t i1);
es_actsparse_qc8w es_gated_mlp_qc8w_down(const es_gated_mlp_qc8w* w);
/* both phases, one thread; h is scratch [n, hidden] */
void es_f32_qc8w_gated_mlp(const es_gated_mlp_qc8w* w, float threshold, size_t n, const float* x, float* h, float* y);

/* Which implementation dispatch picked on this CPU: "scalar", "avx2", "avx512" or "neon". */
const char* es_f32_bcsr_isa(void);

/* Force an implementation by name (tests exercise every variant the CPU can run).
 * Returns 0 on success, -1 if unknown or unsupported here. NULL restores automatic dispatch. */
int es_force_isa(const char* name);

#ifdef __cplusplus
}
#endif
#endif
