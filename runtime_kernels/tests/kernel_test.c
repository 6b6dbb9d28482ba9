/* Every kernel variant this CPU can run, against a dense double-precision reference, on random
 * and edge-case weights: empty row blocks, all-zero and fully dense weights, sizes that are not
 * multiples of the tile, batch 1, and misaligned input/output pointers. Built natively and for
 * aarch64 (run under qemu-aarch64 -cpu cortex-a53 / cortex-a76 / max). Prints one line per
 * failure and a final "N passed, M failed" line; exit code 1 on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgesparse/kernels.h"

static const char* ISAS[] = {"scalar", "avx2", "avx512", "avx512vnni", "neon", "neondot"};
#define NISAS (sizeof(ISAS) / sizeof(ISAS[0]))
static unsigned long long rng = 42;
static float frand(void) {
  rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
  return (float)((rng >> 40) & 0xFFFFFF) / (float)0x1000000 * 2.0f - 1.0f;
}

typedef struct { float* values; int32_t* col; int32_t* ptr; float* dense; } packed;

/* R x C blocks (in must be a multiple of C); density: probability a block is nonzero;
 * mode 1 = every other row block empty */
static packed make_blocks(size_t out, size_t in, size_t R, size_t C, double density, int mode) {
  size_t blocks = (out + R - 1) / R;
  packed p;
  p.dense = calloc(out * in, sizeof(float));
  p.values = malloc((blocks * in * R + 1) * sizeof(float));
  p.col = malloc((blocks * in + 1) * sizeof(int32_t));
  p.ptr = malloc((blocks + 1) * sizeof(int32_t));
  size_t k = 0;
  p.ptr[0] = 0;
  for (size_t b = 0; b < blocks; b++) {
    for (size_t c = 0; c < in; c += C) {
      int keep = (frand() * 0.5f + 0.5f) < density && !(mode == 1 && b % 2 == 1);
      if (!keep) continue;
      p.col[k] = (int32_t)c;
      for (size_t r = 0; r < R; r++)
        for (size_t j = 0; j < C; j++) {
          float v = (b * R + r < out) ? frand() : 0.0f;
          p.values[(k * R + r) * C + j] = v;
          if (b * R + r < out) p.dense[(b * R + r) * in + c + j] = v;
        }
      k++;
    }
    p.ptr[b + 1] = (int32_t)k;
  }
  return p;
}

static packed make_weights(size_t out, size_t in, size_t R, double density, int mode) {
  return make_blocks(out, in, R, 1, density, mode);
}

static int close_enough(const float* got, const double* want, size_t count, const char* what) {
  double scale = 1.0; /* inputs and weights are O(1): the absolute floor covers cancellation */
  for (size_t i = 0; i < count; i++) scale = fmax(scale, fabs(want[i]));
  for (size_t i = 0; i < count; i++) {
    if (!(fabs(got[i] - want[i]) <= 1e-5 * fabs(want[i]) + 1e-6 * scale)) { /* NaN fails too */
      printf("FAIL %s: element %zu got %.9g want %.9g\n", what, i, got[i], want[i]);
      return 0;
    }
  }
  return 1;
}

/* activation-sparse linear: thresholds that skip nothing, some, everything; exact zeros; more
 * inputs than one gather chunk (256); output widths that are not a multiple of the vector */
static void actsparse_tests(int* passed, int* failed) {
  const size_t shapes[][3] = {{64, 48, 1}, {67, 45, 1}, {1, 1, 1}, {130, 600, 3}, {4099, 17, 1}, {33, 1030, 2}};
  const float thresholds[] = {-1.0f, 0.0f, 0.3f, 0.9f, 2.0f};
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (size_t t = 0; t < sizeof(thresholds) / sizeof(thresholds[0]); t++)
      for (int with_bias = 0; with_bias < 2; with_bias++) {
        size_t out = shapes[s][0], in = shapes[s][1], n = shapes[s][2];
        float th = thresholds[t];
        float* wt = malloc(in * out * sizeof(float));
        float* bias = malloc(out * sizeof(float));
        float* xbuf = malloc((n * in + 2) * sizeof(float));
        float* ybuf = malloc((n * out + 2) * sizeof(float));
        float *x = xbuf + 1, *y = ybuf + 1; /* misaligned by one float on purpose */
        double* want = malloc(n * out * sizeof(double));
        for (size_t i = 0; i < in * out; i++) wt[i] = frand();
        for (size_t o = 0; o < out; o++) bias[o] = frand();
        for (size_t i = 0; i < n * in; i++) x[i] = (i % 5 == 0) ? 0.0f : frand(); /* ReLU-like zeros */
        for (size_t row = 0; row < n; row++)
          for (size_t o = 0; o < out; o++) {
            double acc = with_bias ? bias[o] : 0.0;
            for (size_t c = 0; c < in; c++)
              if (fabsf(x[row * in + c]) > th) acc += (double)x[row * in + c] * wt[c * out + o];
            want[row * out + o] = acc;
          }
        es_actsparse_f32 w = {out, in, wt, with_bias ? bias : NULL};
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          char what[160];
          snprintf(what, sizeof what, "%s actsparse out=%zu in=%zu n=%zu threshold=%.1f bias=%d", ISAS[isa], out, in, n, th, with_bias);
          ybuf[0] = ybuf[n * out + 1] = 12345.0f;
          es_f32_actsparse_linear(&w, th, n, x, y);
          int ok = close_enough(y, want, n * out, what) && ybuf[0] == 12345.0f && ybuf[n * out + 1] == 12345.0f;
          ok ? (*passed)++ : (*failed)++;
          memset(y, 0xff, n * out * sizeof(float)); /* NaN: every column must be written again */
          size_t cut = out / 3;
          es_f32_actsparse_linear_cols(&w, th, n, x, y, cut, out);
          es_f32_actsparse_linear_cols(&w, th, n, x, y, 0, cut);
          snprintf(what, sizeof what, "%s actsparse split out=%zu in=%zu threshold=%.1f", ISAS[isa], out, in, th);
          close_enough(y, want, n * out, what) ? (*passed)++ : (*failed)++;
        }
        es_force_isa(NULL);
        free(wt); free(bias); free(xbuf); free(ybuf); free(want);
      }
}

/* int8 BCSR: int32 accumulators bit-exact against an integer reference (extreme values -128/127
 * included), and the dequantized output against the same sums in double. */
/* got[0, n) == want[0, n) exactly; else prints the first difference after `what` and returns 0 */
static int exact_i32(const int32_t* got, const int64_t* want, size_t n, const char* what) {
  for (size_t i = 0; i < n; i++)
    if (got[i] != want[i]) {
      printf("FAIL %s: element %zu got %d want %lld\n", what, i, got[i], (long long)want[i]);
      return 0;
    }
  return 1;
}

static int exact_i8(const int8_t* got, const int8_t* want, size_t n, const char* what) {
  for (size_t i = 0; i < n; i++)
    if (got[i] != want[i]) {
      printf("FAIL %s: element %zu got %d want %d\n", what, i, got[i], want[i]);
      return 0;
    }
  return 1;
}

/* random int8 BCSR Rx1 weights (extremes first) in the kernels' layout: each row block's blocks
 * padded to a multiple of 4 (zero weights, the row block's last column), row r's four weights of a
 * group together; p and values keep the unpadded blocks for the references */
typedef struct { packed p; int8_t* values; int8_t* gvalues; int32_t* gcol; int32_t* gptr; } qs8_weights;

static qs8_weights make_qs8(size_t out, size_t in, size_t R, double density, int mode) {
  qs8_weights q;
  q.p = make_weights(out, in, R, density, mode);
  size_t blocks = (out + R - 1) / R, nnz = (size_t)q.p.ptr[blocks];
  q.values = malloc(nnz * R + 1);
  for (size_t i = 0; i < nnz * R; i++) q.values[i] = i == 0 ? -128 : i == 1 ? 127 : (int8_t)lrintf(q.p.values[i] * 127.0f);
  q.gvalues = calloc(nnz * R + 4 * R * blocks + 1, 1);
  q.gcol = malloc((nnz + 4 * blocks + 1) * sizeof(int32_t));
  q.gptr = malloc((blocks + 1) * sizeof(int32_t));
  q.gptr[0] = 0;
  for (size_t b = 0; b < blocks; b++) {
    size_t count = (size_t)(q.p.ptr[b + 1] - q.p.ptr[b]), padded = (count + 3) / 4 * 4, start = (size_t)q.gptr[b];
    for (size_t i = 0; i < padded; i++) {
      size_t src = (size_t)q.p.ptr[b] + (i < count ? i : count - 1), k = start + i / 4 * 4, j = i % 4;
      q.gcol[start + i] = q.p.col[src];
      for (size_t r = 0; r < R; r++) q.gvalues[k * R + r * 4 + j] = i < count ? q.values[src * R + r] : 0;
    }
    q.gptr[b + 1] = (int32_t)(start + padded);
  }
  return q;
}

static void free_qs8(qs8_weights q) {
  free(q.p.values); free(q.p.col); free(q.p.ptr); free(q.p.dense); free(q.values); free(q.gvalues); free(q.gcol); free(q.gptr);
}

static void qs8_tests(int* passed, int* failed) {
  const size_t shapes[][3] = {{64, 48, 1}, {67, 45, 1}, {1, 1, 1}, {9, 130, 3}, {256, 256, 16}, {33, 17, 5}, {20, 1031, 7}, {40, 96, 37}, {24, 64, 8}, {30, 70, 17}};
  const size_t block_rows[] = {1, 2, 4, 8};
  const double densities[] = {0.0, 0.1, 0.5, 1.0};
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (size_t ri = 0; ri < 4; ri++)
      for (size_t di = 0; di < 4; di++) {
        size_t out = shapes[s][0], in = shapes[s][1], n = shapes[s][2], R = block_rows[ri];
        qs8_weights qw = make_qs8(out, in, R, densities[di], (int)(di % 2));
        packed p = qw.p;
        size_t blocks = (out + R - 1) / R;
        int8_t* values = qw.values, * gvalues = qw.gvalues;
        int32_t* gcol = qw.gcol, * gptr = qw.gptr;
        int8_t* xq = malloc(n * in + 1);
        float* xs = malloc(n * sizeof(float));
        for (size_t i = 0; i < n * in; i++) xq[i] = i == 0 ? -127 : i == 1 ? 127 : (int8_t)lrintf(frand() * 127.0f);
        for (size_t r = 0; r < n; r++) xs[r] = 0.01f + 0.001f * (float)r;
        float* scales = malloc(out * sizeof(float));
        float* bias = malloc(out * sizeof(float));
        for (size_t o = 0; o < out; o++) { scales[o] = 0.002f * (1.0f + frand() * 0.5f); bias[o] = frand(); }
        int64_t* want = calloc(n * out, sizeof(int64_t));
        double* want_y = malloc(n * out * sizeof(double));
        for (size_t row = 0; row < n; row++)
          for (size_t b = 0; b < (out + R - 1) / R; b++)
            for (int32_t k = p.ptr[b]; k < p.ptr[b + 1]; k++)
              for (size_t r = 0; r < R && b * R + r < out; r++)
                want[row * out + b * R + r] += (int64_t)values[(size_t)k * R + r] * xq[row * in + p.col[k]];
        for (size_t i = 0; i < n * out; i++)
          want_y[i] = (double)want[i] * scales[i % out] * xs[i / out] + bias[i % out];
        int32_t* acc = malloc(n * out * sizeof(int32_t));
        float* y = malloc(n * out * sizeof(float));
        es_bcsr_qs8 w = {out, in, R, gvalues, gcol, gptr, scales, bias};
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          char what[160];
          memset(acc, 0x5a, n * out * sizeof(int32_t));
          es_qs8_bcsr_linear_blocks(&w, n, xq, NULL, xs, NULL, acc, blocks / 2, blocks);
          es_qs8_bcsr_linear_blocks(&w, n, xq, NULL, xs, NULL, acc, 0, blocks / 2);
          snprintf(what, sizeof what, "%s qs8 int32 out=%zu in=%zu n=%zu R=%zu", ISAS[isa], out, in, n, R);
          exact_i32(acc, want, n * out, what) ? (*passed)++ : (*failed)++;
          es_qs8_bcsr_linear_blocks(&w, n, xq, NULL, xs, y, NULL, 0, blocks);
          snprintf(what, sizeof what, "%s qs8 f32 out=%zu in=%zu n=%zu R=%zu", ISAS[isa], out, in, n, R);
          close_enough(y, want_y, n * out, what) ? (*passed)++ : (*failed)++;
          const size_t tile_bytes = es_qs8_tiles_bytes(n, in);
          if (tile_bytes) { /* the rows-in-lanes kernel: tiles made once, two pieces, the same checks */
            uint8_t* tiles = malloc(tile_bytes);
            es_qs8_make_tiles(n, in, xq, tiles);
            memset(acc, 0x5a, n * out * sizeof(int32_t));
            es_qs8_bcsr_linear_blocks(&w, n, xq, tiles, xs, NULL, acc, blocks / 3, blocks);
            es_qs8_bcsr_linear_blocks(&w, n, xq, tiles, xs, NULL, acc, 0, blocks / 3);
            snprintf(what, sizeof what, "%s qs8 tiles int32 out=%zu in=%zu n=%zu R=%zu", ISAS[isa], out, in, n, R);
            exact_i32(acc, want, n * out, what) ? (*passed)++ : (*failed)++;
            es_qs8_bcsr_linear_blocks(&w, n, xq, tiles, xs, y, NULL, 0, blocks);
            snprintf(what, sizeof what, "%s qs8 tiles f32 out=%zu in=%zu n=%zu R=%zu", ISAS[isa], out, in, n, R);
            close_enough(y, want_y, n * out, what) ? (*passed)++ : (*failed)++;
            free(tiles);
          }
        }
        es_force_isa(NULL);
        free_qs8(qw);
        free(xq); free(xs);
        free(scales); free(bias); free(want); free(want_y); free(acc); free(y);
      }
}

/* static int8 1x1 conv (NCHW, quantized in and out): every ISA equals the integer reference byte
 * for byte, over output zero points, fused clamps (ReLU-like y_min = y_zp), biases or none, pixel counts
 * that are not a multiple of 16 or 4, and two pieces of row blocks. */
static void qs8_conv_tests(int* passed, int* failed) {
  const size_t shapes[][3] = {{24, 16, 49}, {33, 17, 5}, {64, 96, 196}, {8, 40, 1}, {20, 1031, 17}, {96, 24, 3136},
                              {40, 64, 4}, {17, 30, 12}, {48, 20, 7}};
  const size_t block_rows[] = {1, 2, 4, 8};
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (size_t ri = 0; ri < 4; ri++)
      for (size_t variant = 0; variant < 2; variant++) {
        size_t out = shapes[s][0], in = shapes[s][1], P = shapes[s][2], R = block_rows[ri];
        qs8_weights qw = make_qs8(out, in, R, variant ? 0.3 : 0.1, (int)variant);
        size_t blocks = (out + R - 1) / R;
        int8_t* x = malloc(in * P + 1);
        for (size_t i = 0; i < in * P; i++) x[i] = i == 0 ? -128 : i == 1 ? 127 : (int8_t)lrintf(frand() * 127.0f);
        float* mult = malloc(out * sizeof(float));
        int32_t* bias = malloc(out * sizeof(int32_t));
        for (size_t o = 0; o < out; o++) {
          mult[o] = 0.004f * (1.0f + frand() * 0.5f);
          bias[o] = (int32_t)lrintf(frand() * 3000.0f);
        }
        es_qs8_requant q = {variant ? -20 : 5, variant ? -20 : -128, variant ? 100 : 127, mult, variant ? bias : NULL};
        int8_t* want = malloc(out * P + 1);
        for (size_t b = 0; b < blocks; b++)
          for (size_t r = 0; r < R && b * R + r < out; r++)
            for (size_t p = 0; p < P; p++) {
              int64_t acc = q.bias ? q.bias[b * R + r] : 0;
              for (int32_t k = qw.p.ptr[b]; k < qw.p.ptr[b + 1]; k++)
                acc += (int64_t)qw.values[(size_t)k * R + r] * x[(size_t)qw.p.col[k] * P + p];
              double v = (double)((float)acc * mult[b * R + r]);
              v = nearbyint(v) + q.y_zp;
              want[(b * R + r) * P + p] = (int8_t)(v < q.y_min ? q.y_min : v > q.y_max ? q.y_max : v);
            }
        int8_t* y = malloc(out * P + 1);
        es_bcsr_qs8 w = {out, in, R, qw.gvalues, qw.gcol, qw.gptr, NULL, NULL};
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          memset(y, 0x5a, out * P);
          es_qs8_bcsr_conv1x1_nchw(&w, &q, P, x, y, blocks / 3, blocks);
          es_qs8_bcsr_conv1x1_nchw(&w, &q, P, x, y, 0, blocks / 3);
          char what[120];
          snprintf(what, sizeof what, "%s qs8 conv1x1 out=%zu in=%zu pixels=%zu R=%zu", ISAS[isa], out, in, P, R);
          exact_i8(y, want, out * P, what) ? (*passed)++ : (*failed)++;
        }
        es_force_isa(NULL);
        free_qs8(qw);
        free(x); free(mult); free(bias); free(want); free(y);
      }
}

/* static int8 depthwise 3x3 and add (qs8-chain): every ISA equals an int64 reference byte for byte
 * over strides 1 and 2, odd and tiny planes (1x1 to 9x8), zero points, clamps, bias or none, and
 * two pieces of channels. */
static void qs8_chain_tests(int* passed, int* failed) {
  const size_t planes[][2] = {{1, 1}, {2, 2}, {4, 4}, {5, 7}, {7, 6}, {9, 8}, {16, 16}, {6, 40}, {3, 63}};
  for (size_t pi = 0; pi < sizeof(planes) / sizeof(planes[0]); pi++)
    for (size_t s = 1; s <= 2; s++)
      for (size_t variant = 0; variant < 2; variant++) {
        const size_t C = variant ? 19 : 8, H = planes[pi][0], W = planes[pi][1];
        const size_t oh = es_dwconv3x3_out_size(H, s), ow = es_dwconv3x3_out_size(W, s);
        int8_t* x = malloc(C * H * W), * k = malloc(C * 9), * want = malloc(C * oh * ow), * y = malloc(C * oh * ow);
        float* mult = malloc(C * sizeof(float));
        int32_t* bias = malloc(C * sizeof(int32_t));
        for (size_t i = 0; i < C * H * W; i++) x[i] = i == 0 ? -128 : (int8_t)lrintf(frand() * 127.0f);
        for (size_t i = 0; i < C * 9; i++) k[i] = i == 0 ? -127 : (int8_t)lrintf(frand() * 127.0f);
        for (size_t c = 0; c < C; c++) { mult[c] = 0.002f * (1.0f + frand() * 0.5f); bias[c] = (int32_t)lrintf(frand() * 2000.0f); }
        es_dwconv3x3_qs8 w = {C, s, k, variant ? 9 : -4};
        es_qs8_requant q = {variant ? 3 : -128, variant ? 3 : -128, variant ? 110 : 127, mult, variant ? bias : NULL};
        for (size_t c = 0; c < C; c++)
          for (size_t oy = 0; oy < oh; oy++)
            for (size_t ox = 0; ox < ow; ox++) {
              int64_t acc = q.bias ? q.bias[c] : 0;
              for (long ky = -1; ky <= 1; ky++)
                for (long kx = -1; kx <= 1; kx++) {
                  long iy = (long)(oy * s) + ky, ix = (long)(ox * s) + kx;
                  if (iy >= 0 && iy < (long)H && ix >= 0 && ix < (long)W)
                    acc += (int64_t)k[c * 9 + (ky + 1) * 3 + kx + 1] * (x[(c * H + iy) * W + ix] - w.x_zp);
                }
              double v = nearbyint((double)((float)acc * mult[c])) + q.y_zp;
              want[(c * oh + oy) * ow + ox] = (int8_t)(v < q.y_min ? q.y_min : v > q.y_max ? q.y_max : v);
            }
        int32_t* scratch = malloc(es_qs8_dwconv3x3_scratch(H, W, s) * sizeof(int32_t));
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          memset(y, 0x5a, C * oh * ow);
          es_qs8_dwconv3x3_nchw_channels(&w, &q, H, W, x, y, scratch, C / 3, C);
          es_qs8_dwconv3x3_nchw_channels(&w, &q, H, W, x, y, scratch, 0, C / 3);
          char what[120];
          snprintf(what, sizeof what, "%s qs8 dwconv3x3 %zux%zu stride %zu C=%zu", ISAS[isa], H, W, s, C);
          exact_i8(y, want, C * oh * ow, what) ? (*passed)++ : (*failed)++;
          /* the add, on the input and its first channels' reversal */
          const size_t n = C * H * W;
          es_qs8_add_params ap = {variant ? 5 : -7, variant ? -2 : 11, 0.7f + 0.1f * (float)variant, 1.3f, q};
          int8_t* b = malloc(n), * sum = malloc(n), * sum_want = malloc(n);
          for (size_t i = 0; i < n; i++) b[i] = x[n - 1 - i];
          for (size_t i = 0; i < n; i++) {
            const float v = (float)(x[i] - ap.a_zp) * ap.a_mult + (float)(b[i] - ap.b_zp) * ap.b_mult;
            const double r = nearbyint((double)v) + q.y_zp;
            sum_want[i] = (int8_t)(r < q.y_min ? q.y_min : r > q.y_max ? q.y_max : r);
          }
          es_qs8_add(&ap, n, x, b, sum);
          snprintf(what, sizeof what, "%s qs8 add n=%zu", ISAS[isa], n);
          exact_i8(sum, sum_want, n, what) ? (*passed)++ : (*failed)++;
          free(b); free(sum); free(sum_want);
        }
        es_force_isa(NULL);
        free(x); free(k); free(want); free(y); free(mult); free(bias); free(scratch);
      }
}

/* N:M: (n, m) pairs on both the shuffle path (m = 2n) and the general one; kept counts that are
 * not a multiple of any vector width; linear (batch 1, 3, 4, 9) and conv1x1; split outputs. */
static void nm_tests(int* passed, int* failed) {
  const size_t nms[][2] = {{2, 4}, {1, 2}, {4, 8}, {8, 16}, {1, 4}, {3, 8}, {2, 3}};
  const size_t shapes[][3] = {{64, 16, 1}, {67, 11, 4}, {1, 1, 1}, {9, 40, 3}, {33, 65, 9}, {128, 64, 16}};
  for (size_t t = 0; t < sizeof(nms) / sizeof(nms[0]); t++)
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
      for (int with_bias = 0; with_bias < 2; with_bias++) {
        size_t n = nms[t][0], m = nms[t][1], out = shapes[s][0], in = shapes[s][1] * m, rows = shapes[s][2];
        size_t kept = in / m * n;
        float* values = malloc((out * kept + 1) * sizeof(float));
        uint8_t* idx = malloc(out * kept + 1);
        float* dense = calloc(out * in, sizeof(float));
        for (size_t o = 0; o < out; o++)
          for (size_t g = 0; g < in / m; g++) {
            size_t first = (size_t)((frand() * 0.5f + 0.5f) * (float)(m - n + 1)) % (m - n + 1);
            for (size_t j = 0; j < n; j++) { /* n increasing positions inside the group */
              size_t k = o * kept + g * n + j, pos = first + j;
              values[k] = (g + j) % 7 == 3 ? 0.0f : frand(); /* some kept weights are zero */
              idx[k] = (uint8_t)pos;
              dense[o * in + g * m + pos] = values[k];
            }
          }
        float* bias = malloc(out * sizeof(float));
        for (size_t o = 0; o < out; o++) bias[o] = frand();
        float* xbuf = malloc((rows * in + 2) * sizeof(float));
        float* ybuf = malloc((rows * out + 2) * sizeof(float));
        float *x = xbuf + 1, *y = ybuf + 1; /* misaligned by one float on purpose */
        for (size_t i = 0; i < rows * in; i++) x[i] = frand();
        double* want_lin = malloc(rows * out * sizeof(double));
        double* want_conv = malloc(rows * out * sizeof(double));
        for (size_t r = 0; r < rows; r++)
          for (size_t o = 0; o < out; o++) {
            double a = with_bias ? bias[o] : 0.0, b = a;
            for (size_t c = 0; c < in; c++) {
              a += (double)dense[o * in + c] * x[r * in + c];
              b += (double)dense[o * in + c] * x[c * rows + r]; /* conv: x is [in, pixels = rows] */
            }
            want_lin[r * out + o] = a;
            want_conv[o * rows + r] = b;
          }
        es_nm_f32 w = {out, in, n, m, values, idx, with_bias ? bias : NULL};
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          char what[160];
          snprintf(what, sizeof what, "%s nm %zu:%zu linear out=%zu in=%zu rows=%zu bias=%d", ISAS[isa], n, m, out, in, rows, with_bias);
          ybuf[0] = ybuf[rows * out + 1] = 12345.0f;
          es_f32_nm_linear(&w, rows, x, y);
          int ok = close_enough(y, want_lin, rows * out, what) && ybuf[0] == 12345.0f && ybuf[rows * out + 1] == 12345.0f;
          ok ? (*passed)++ : (*failed)++;
          memset(y, 0xff, rows * out * sizeof(float)); /* NaN: every output must be written again */
          es_f32_nm_linear_outs(&w, rows, x, y, out / 3, out);
          es_f32_nm_linear_outs(&w, rows, x, y, 0, out / 3);
          close_enough(y, want_lin, rows * out, what) ? (*passed)++ : (*failed)++;
          snprintf(what, sizeof what, "%s nm %zu:%zu conv1x1 out=%zu in=%zu px=%zu bias=%d", ISAS[isa], n, m, out, in, rows, with_bias);
          es_f32_nm_conv1x1_nchw_outs(&w, rows, x, y, out / 2, out);
          es_f32_nm_conv1x1_nchw_outs(&w, rows, x, y, 0, out / 2);
          ok = close_enough(y, want_conv, rows * out, what) && ybuf[0] == 12345.0f && ybuf[rows * out + 1] == 12345.0f;
          ok ? (*passed)++ : (*failed)++;
        }
        es_force_isa(NULL);
        free(values); free(idx); free(dense); free(bias); free(xbuf); free(ybuf); free(want_lin); free(want_conv);
      }
}

/* gated MLP (CATS): SiLU and ReLU gates, with and without biases, thresholds from none to all
 * neurons dead, one for all neurons or one per neuron (CHESS), phases split as threads would split
 * them. Thresholds are nudged away from every |act(gate)| so float and double agree on which
 * neurons live. */
static void gated_tests(int* passed, int* failed) {
  const size_t shapes[][4] = {{64, 48, 40, 1}, {67, 130, 33, 3}, {1, 1, 1, 1}, {130, 600, 17, 2}, {256, 300, 256, 1}};
  const float thresholds[] = {-1.0f, 0.0f, 0.1f, 0.4f, 100.0f};
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (int act = 0; act < 2; act++)
      for (int with_bias = 0; with_bias < 2; with_bias++)
        for (size_t t = 0; t < 2 * sizeof(thresholds) / sizeof(thresholds[0]); t++) {
          const int per_neuron = t >= sizeof(thresholds) / sizeof(thresholds[0]);
          size_t in = shapes[s][0], hidden = shapes[s][1], out = shapes[s][2], n = shapes[s][3];
          float* gate = malloc(hidden * in * sizeof(float));
          float* bundle = malloc(hidden * (in + out) * sizeof(float));
          float* gb = malloc(hidden * sizeof(float));
          float* ub = malloc(hidden * sizeof(float));
          float* db = malloc(out * sizeof(float));
          float* x = malloc(n * in * sizeof(float));
          for (size_t i = 0; i < hidden * in; i++) gate[i] = frand() * 0.3f;
          for (size_t i = 0; i < hidden * (in + out); i++) bundle[i] = frand();
          for (size_t i = 0; i < hidden; i++) { gb[i] = frand(); ub[i] = frand(); }
          for (size_t i = 0; i < out; i++) db[i] = frand();
          for (size_t i = 0; i < n * in; i++) x[i] = frand();
          double* a = malloc(n * hidden * sizeof(double));
          for (size_t r = 0; r < n; r++)
            for (size_t i = 0; i < hidden; i++) {
              double g = with_bias ? gb[i] : 0.0;
              for (size_t c = 0; c < in; c++) g += (double)gate[c * hidden + i] * x[r * in + c];  /* gate is [in, hidden] */
              a[r * hidden + i] = act == ES_ACT_RELU ? (g > 0 ? g : 0) : g / (1.0 + exp(-g));
            }
          float th = thresholds[t % (sizeof(thresholds) / sizeof(thresholds[0]))];
          float* tv = malloc(hidden * sizeof(float)); /* per neuron: th, th + 0.1, th + 0.2, ... */
          for (size_t i = 0; i < hidden; i++) tv[i] = per_neuron ? th + 0.1f * (float)(i % 3) : th;
          for (size_t i = 0; i < hidden; i++)
            for (int moved = 1; moved;) { /* keep each threshold clear of its neuron's |a| */
              moved = 0;
              for (size_t r = 0; r < n && !moved; r++)
                if (fabs(fabs(a[r * hidden + i]) - tv[i]) < 1e-3) { tv[i] += 2e-3f; moved = 1; }
            }
          if (!per_neuron) /* one scalar: the largest nudge keeps it clear of every neuron */
            for (size_t i = 0; i < hidden; i++) th = tv[i] > th ? tv[i] : th;
          for (int moved = 1; !per_neuron && moved;) {
            moved = 0;
            for (size_t i = 0; i < n * hidden && !moved; i++)
              if (fabs(fabs(a[i]) - th) < 1e-3) { th += 2e-3f; moved = 1; }
          }
          if (!per_neuron)
            for (size_t i = 0; i < hidden; i++) tv[i] = th;
          double* want = malloc(n * out * sizeof(double));
          for (size_t r = 0; r < n; r++)
            for (size_t o = 0; o < out; o++) {
              double acc = with_bias ? db[o] : 0.0;
              for (size_t i = 0; i < hidden; i++) {
                if (!(fabs(a[r * hidden + i]) > tv[i])) continue;
                double u = with_bias ? ub[i] : 0.0;
                for (size_t c = 0; c < in; c++) u += (double)bundle[i * (in + out) + c] * x[r * in + c];
                acc += a[r * hidden + i] * u * bundle[i * (in + out) + in + o];
              }
              want[r * out + o] = acc;
            }
          es_gated_mlp_f32 w = {in, hidden, out, gate, bundle, with_bias ? gb : NULL, with_bias ? ub : NULL,
                                with_bias ? db : NULL, act, per_neuron ? tv : NULL};
          float* h = malloc(n * hidden * sizeof(float));
          float* y = malloc(n * out * sizeof(float));
          for (size_t isa = 0; isa < NISAS; isa++) {
            if (es_force_isa(ISAS[isa]) != 0) continue;
            char what[160];
            snprintf(what, sizeof what, "%s gated in=%zu hidden=%zu out=%zu n=%zu act=%d bias=%d threshold=%.3f%s", ISAS[isa], in, hidden, out, n, act, with_bias, th, per_neuron ? " per-neuron" : "");
            es_f32_gated_mlp(&w, th, n, x, h, y);
            close_enough(y, want, n * out, what) ? (*passed)++ : (*failed)++;
            memset(h, 0xff, n * hidden * sizeof(float));
            memset(y, 0xff, n * out * sizeof(float));
            es_f32_gated_mlp_hidden(&w, th, n, x, h, hidden / 3, hidden);
            es_f32_gated_mlp_hidden(&w, th, n, x, h, 0, hidden / 3);
            const es_actsparse_f32 down = es_gated_mlp_down(&w);
            es_f32_actsparse_linear_cols(&down, 0.0f, n, h, y, out / 2, out);
            es_f32_actsparse_linear_cols(&down, 0.0f, n, h, y, 0, out / 2);
            close_enough(y, want, n * out, what) ? (*passed)++ : (*failed)++;
          }
          es_force_isa(NULL);
          free(gate); free(bundle); free(gb); free(ub); free(db); free(x); free(a); free(want); free(h); free(y); free(tv);
        }
}

/* activation sparsity on int8 weights (qs8-actsparse): both linear flavours and the int8 gated MLP
 * (gate phase as an input-major GEMV), against double references; thresholds from none to all
 * skipped, exact zeros, widths that are not vector multiples, more inputs than one gather chunk,
 * a strided weight (the gated MLP's down columns), output ranges split as threads split them. */
static int8_t qrand(void) { return (int8_t)lrintf(frand() * 127.0f); }

static void qs8_actsparse_tests(int* passed, int* failed) {
  const size_t shapes[][3] = {{64, 48, 1}, {67, 45, 1}, {1, 1, 1}, {9, 300, 3}, {256, 256, 2}, {33, 17, 5}};
  const float thresholds[] = {-1.0f, 0.0f, 0.3f, 0.7f, 100.0f};
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (size_t t = 0; t < sizeof(thresholds) / sizeof(thresholds[0]); t++)
      for (int with_bias = 0; with_bias < 2; with_bias++) {
        const size_t out = shapes[s][0], in = shapes[s][1], n = shapes[s][2], stride = out + 3;
        int8_t* wt = malloc(in * stride);
        float* scales = malloc(out * sizeof(float));
        float* bias = malloc(out * sizeof(float));
        float* x = malloc(n * in * sizeof(float));
        int8_t* xq = malloc(n * in);
        float* xs = malloc(n * sizeof(float));
        for (size_t i = 0; i < in * stride; i++) wt[i] = qrand();
        for (size_t o = 0; o < out; o++) { scales[o] = (frand() + 1.5f) / 127.0f; bias[o] = frand(); }
        for (size_t i = 0; i < n * in; i++) x[i] = (i % 5 == 0) ? 0.0f : frand();
        const float th = thresholds[t];
        for (size_t i = 0; i < n * in; i++) /* keep |x| clear of the threshold: float and double agree */
          if (fabsf(fabsf(x[i]) - th) < 1e-3f) x[i] += 3e-3f;
        es_qs8_quantize_rows(n, in, x, xq, xs);
        double* want_f = malloc(n * out * sizeof(double));
        double* want_q = malloc(n * out * sizeof(double));
        for (size_t r = 0; r < n; r++)
          for (size_t o = 0; o < out; o++) {
            double af = 0.0;
            long long aq = 0;
            for (size_t c = 0; c < in; c++)
              if (fabsf(x[r * in + c]) > th) {
                af += (double)x[r * in + c] * wt[c * stride + o];
                aq += (long long)xq[r * in + c] * wt[c * stride + o];
              }
            want_f[r * out + o] = af * scales[o] + (with_bias ? bias[o] : 0.0);
            want_q[r * out + o] = (double)aq * ((double)scales[o] * xs[r]) + (with_bias ? bias[o] : 0.0);
          }
        es_actsparse_qc8w w = {out, in, wt, scales, with_bias ? bias : NULL, stride};
        float* y = malloc(n * out * sizeof(float));
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          char what[160];
          const size_t cut = out / 3;
          memset(y, 0xff, n * out * sizeof(float));
          es_f32_qc8w_actsparse_linear_cols(&w, th, n, x, y, cut, out);
          es_f32_qc8w_actsparse_linear_cols(&w, th, n, x, y, 0, cut);
          snprintf(what, sizeof what, "%s f32-qc8w actsparse out=%zu in=%zu n=%zu threshold=%.1f bias=%d", ISAS[isa], out, in, n, th, with_bias);
          close_enough(y, want_f, n * out, what) ? (*passed)++ : (*failed)++;
          memset(y, 0xff, n * out * sizeof(float));
          es_qs8_actsparse_linear_cols(&w, th, n, x, xq, xs, y, cut, out);
          es_qs8_actsparse_linear_cols(&w, th, n, x, xq, xs, y, 0, cut);
          snprintf(what, sizeof what, "%s qs8 actsparse out=%zu in=%zu n=%zu threshold=%.1f bias=%d", ISAS[isa], out, in, n, th, with_bias);
          close_enough(y, want_q, n * out, what) ? (*passed)++ : (*failed)++;
        }
        es_force_isa(NULL);
        free(wt); free(scales); free(bias); free(x); free(xq); free(xs); free(want_f); free(want_q); free(y);
      }

  /* the int8 gated MLP */
  const size_t mlps[][4] = {{64, 48, 40, 1}, {67, 130, 33, 3}, {1, 1, 1, 1}, {130, 600, 17, 2}, {256, 300, 256, 1}};
  for (size_t s = 0; s < sizeof(mlps) / sizeof(mlps[0]); s++)
    for (int act = 0; act < 2; act++)
      for (size_t t = 0; t < 2 * sizeof(thresholds) / sizeof(thresholds[0]); t++) {
        const int per_neuron = t >= sizeof(thresholds) / sizeof(thresholds[0]), with_bias = (int)(t % 2);
        const size_t in = mlps[s][0], hidden = mlps[s][1], out = mlps[s][2], n = mlps[s][3];
        int8_t* gate = malloc(in * hidden);
        int8_t* bundle = malloc(hidden * (in + out));
        float *gs = malloc(hidden * sizeof(float)), *us = malloc(hidden * sizeof(float)), *ds = malloc(out * sizeof(float));
        float *gb = malloc(hidden * sizeof(float)), *ub = malloc(hidden * sizeof(float)), *db = malloc(out * sizeof(float));
        float* x = malloc(n * in * sizeof(float));
        for (size_t i = 0; i < in * hidden; i++) gate[i] = qrand();
        for (size_t i = 0; i < hidden * (in + out); i++) bundle[i] = qrand();
        for (size_t i = 0; i < hidden; i++) { gs[i] = 0.3f * (frand() + 1.5f) / 127.0f; us[i] = (frand() + 1.5f) / 127.0f; gb[i] = frand(); ub[i] = frand(); }
        for (size_t i = 0; i < out; i++) { ds[i] = (frand() + 1.5f) / 127.0f; db[i] = frand(); }
        for (size_t i = 0; i < n * in; i++) x[i] = frand();
        double* a = malloc(n * hidden * sizeof(double));
        for (size_t r = 0; r < n; r++)
          for (size_t i = 0; i < hidden; i++) {
            double g = 0.0;
            for (size_t c = 0; c < in; c++) g += (double)gate[c * hidden + i] * x[r * in + c];
            g = g * gs[i] + (with_bias ? gb[i] : 0.0);
            a[r * hidden + i] = act == ES_ACT_RELU ? (g > 0 ? g : 0) : g / (1.0 + exp(-g));
          }
        float th = thresholds[t % (sizeof(thresholds) / sizeof(thresholds[0]))];
        float* tv = malloc(hidden * sizeof(float));
        for (size_t i = 0; i < hidden; i++) tv[i] = per_neuron ? th + 0.1f * (float)(i % 3) : th;
        for (int moved = 1; moved;) { /* thresholds clear of every |a| (and, scalar, all equal) */
          moved = 0;
          for (size_t i = 0; i < hidden && !moved; i++)
            for (size_t r = 0; r < n * hidden && !moved; r++)
              if ((per_neuron ? r % hidden == i : 1) && fabs(fabs(a[r]) - tv[i]) < 1e-3) {
                if (per_neuron) tv[i] += 2e-3f;
                else { th += 2e-3f; for (size_t j = 0; j < hidden; j++) tv[j] = th; }
                moved = 1;
              }
        }
        double* want = malloc(n * out * sizeof(double));
        for (size_t r = 0; r < n; r++)
          for (size_t o = 0; o < out; o++) {
            double acc = 0.0;
            for (size_t i = 0; i < hidden; i++) {
              if (!(fabs(a[r * hidden + i]) > tv[i])) continue;
              double u = 0.0;
              for (size_t c = 0; c < in; c++) u += (double)bundle[i * (in + out) + c] * x[r * in + c];
              u = u * us[i] + (with_bias ? ub[i] : 0.0);
              acc += a[r * hidden + i] * u * bundle[i * (in + out) + in + o];
            }
            want[r * out + o] = acc * ds[o] + (with_bias ? db[o] : 0.0);
          }
        es_gated_mlp_qc8w w = {in, hidden, out, gate, gs, bundle, us, ds, with_bias ? gb : NULL, with_bias ? ub : NULL,
                               with_bias ? db : NULL, act, per_neuron ? tv : NULL};
        float* h = malloc(n * hidden * sizeof(float));
        float* y = malloc(n * out * sizeof(float));
        for (size_t isa = 0; isa < NISAS; isa++) {
          if (es_force_isa(ISAS[isa]) != 0) continue;
          char what[160];
          snprintf(what, sizeof what, "%s qc8w gated in=%zu hidden=%zu out=%zu n=%zu act=%d bias=%d threshold=%.3f%s", ISAS[isa], in, hidden, out, n, act, with_bias, th, per_neuron ? " per-neuron" : "");
          es_f32_qc8w_gated_mlp(&w, th, n, x, h, y);
          close_enough(y, want, n * out, what) ? (*passed)++ : (*failed)++;
          memset(h, 0xff, n * hidden * sizeof(float));
          memset(y, 0xff, n * out * sizeof(float));
          es_f32_qc8w_gated_mlp_hidden(&w, th, n, x, h, hidden / 3, hidden);
          es_f32_qc8w_gated_mlp_hidden(&w, th, n, x, h, 0, hidden / 3);
          const es_actsparse_qc8w down = es_gated_mlp_qc8w_down(&w);
          es_f32_qc8w_actsparse_linear_cols(&down, 0.0f, n, h, y, out / 2, out);
          es_f32_qc8w_actsparse_linear_cols(&down, 0.0f, n, h, y, 0, out / 2);
          close_enough(y, want, n * out, what) ? (*passed)++ : (*failed)++;
        }
        es_force_isa(NULL);
        free(gate); free(bundle); free(gs); free(us); free(ds); free(gb); free(ub); free(db); free(x); free(a);
        free(tv); free(want); free(h); free(y);
      }
}

/* fused 1x1 conv: residual on / off, ReLU6 / ReLU / no clamp; pixel counts below, at and past a
 * vector (the few-pixels path, tiles, remainders); Rx1 and 1xC blocks; split row blocks */
static void fused_tests(int* passed, int* failed) {
  const size_t block_shapes[][2] = {{1, 1}, {4, 1}, {8, 1}, {1, 4}};
  const size_t pixel_counts[] = {1, 3, 16, 37};
  const float clamps[][2] = {{0.0f, 6.0f}, {0.0f, INFINITY}, {-INFINITY, INFINITY}, {-0.3f, 0.2f}};
  for (size_t bi = 0; bi < 4; bi++)
    for (size_t pi = 0; pi < 4; pi++)
      for (size_t ci = 0; ci < 4; ci++)
        for (int with_res = 0; with_res < 2; with_res++) {
          const size_t R = block_shapes[bi][0], C = block_shapes[bi][1], out = 21, in = 24, n = pixel_counts[pi];
          packed p = make_blocks(out, in, R, C, 0.4, 0);
          float* bias = malloc(out * sizeof(float));
          for (size_t o = 0; o < out; o++) bias[o] = frand();
          float* x = malloc(in * n * sizeof(float));
          float* res = malloc(out * n * sizeof(float));
          float* y = malloc(out * n * sizeof(float));
          double* want = malloc(out * n * sizeof(double));
          for (size_t i = 0; i < in * n; i++) x[i] = 4.0f * frand();
          for (size_t i = 0; i < out * n; i++) res[i] = 4.0f * frand();
          for (size_t o = 0; o < out; o++)
            for (size_t px = 0; px < n; px++) {
              double acc = bias[o] + (with_res ? res[o * n + px] : 0.0);
              for (size_t c = 0; c < in; c++) acc += (double)p.dense[o * in + c] * x[c * n + px];
              want[o * n + px] = fmin(fmax(acc, clamps[ci][0]), clamps[ci][1]);
            }
          es_bcsr_f32 w = {out, in, R, C, p.values, p.col, p.ptr, bias};
          es_epilogue_f32 e = {with_res ? res : NULL, clamps[ci][0], clamps[ci][1]};
          const size_t blocks = es_bcsr_row_blocks(&w);
          for (size_t isa = 0; isa < NISAS; isa++) {
            if (es_force_isa(ISAS[isa]) != 0) continue;
            char what[160];
            snprintf(what, sizeof what, "%s conv1x1 fused px=%zu %zux%zu clamp=[%g,%g] residual=%d", ISAS[isa], n, R, C,
                     clamps[ci][0], clamps[ci][1], with_res);
            es_f32_bcsr_conv1x1_nchw_fused_blocks(&w, &e, n, x, y, blocks / 2, blocks);
            es_f32_bcsr_conv1x1_nchw_fused_blocks(&w, &e, n, x, y, 0, blocks / 2);
            close_enough(y, want, out * n, what) ? (*passed)++ : (*failed)++;
          }
          es_force_isa(NULL);
          free(p.values); free(p.col); free(p.ptr); free(p.dense); free(bias); free(x); free(res); free(y); free(want);
        }
}

/* depthwise 3x3: stride 1 and 2, planes from 1x1 to wider than a vector, odd and even sizes,
 * non-square, with / without bias, clamps; channels split in two calls */
static void dwconv_tests(int* passed, int* failed) {
  const size_t planes[][2] = {{1, 1}, {2, 2}, {4, 4}, {7, 7}, {8, 8}, {5, 19}, {32, 32}, {33, 18}};
  const float clamps[][2] = {{0.0f, 6.0f}, {-INFINITY, INFINITY}};
  for (size_t pi = 0; pi < sizeof(planes) / sizeof(planes[0]); pi++)
    for (size_t stride = 1; stride <= 2; stride++)
      for (size_t ci = 0; ci < 2; ci++)
        for (int with_bias = 0; with_bias < 2; with_bias++) {
          const size_t h = planes[pi][0], wd = planes[pi][1], ch = pi % 2 ? 70 : 5; /* 70: past one channel block */
          const size_t oh = es_dwconv3x3_out_size(h, stride), ow = es_dwconv3x3_out_size(wd, stride);
          float* k = malloc(ch * 9 * sizeof(float));
          float* bias = malloc(ch * sizeof(float));
          float* x = malloc(ch * h * wd * sizeof(float));
          float* y = malloc((ch * oh * ow + 1) * sizeof(float));
          double* want = malloc(ch * oh * ow * sizeof(double));
          for (size_t i = 0; i < ch * 9; i++) k[i] = frand();
          for (size_t i = 0; i < ch; i++) bias[i] = frand();
          for (size_t i = 0; i < ch * h * wd; i++) x[i] = 4.0f * frand();
          for (size_t c = 0; c < ch; c++)
            for (size_t oy = 0; oy < oh; oy++)
              for (size_t ox = 0; ox < ow; ox++) {
                double acc = with_bias ? bias[c] : 0.0;
                for (long ky = 0; ky < 3; ky++)
                  for (long kx = 0; kx < 3; kx++) {
                    const long iy = (long)(oy * stride) + ky - 1, ix = (long)(ox * stride) + kx - 1;
                    if (iy >= 0 && iy < (long)h && ix >= 0 && ix < (long)wd)
                      acc += (double)k[c * 9 + ky * 3 + kx] * x[(c * h + iy) * wd + ix];
                  }
                want[(c * oh + oy) * ow + ox] = fmin(fmax(acc, clamps[ci][0]), clamps[ci][1]);
              }
          es_dwconv3x3_f32 w = {ch, stride, k, with_bias ? bias : NULL, clamps[ci][0], clamps[ci][1]};
          float* scratch = malloc(es_f32_dwconv3x3_scratch(h, wd, stride) * sizeof(float));
          for (size_t isa = 0; isa < NISAS; isa++) {
            if (es_force_isa(ISAS[isa]) != 0) continue;
            char what[160];
            snprintf(what, sizeof what, "%s dwconv3x3 %zux%zu stride %zu clamp=[%g,%g] bias=%d", ISAS[isa], h, wd, stride,
                     clamps[ci][0], clamps[ci][1], with_bias);
            y[ch * oh * ow] = 12345.0f;
            es_f32_dwconv3x3_nchw_channels(&w, h, wd, x, y, scratch, 2, ch);
            es_f32_dwconv3x3_nchw_channels(&w, h, wd, x, y, scratch, 0, 2);
            (close_enough(y, want, ch * oh * ow, what) && y[ch * oh * ow] == 12345.0f) ? (*passed)++ : (*failed)++;
          }
          es_force_isa(NULL);
          free(k); free(bias); free(x); free(y); free(want); free(scratch);
        }
}

int main(void) {
  const size_t shapes[][3] = {{64, 48, 1}, {67, 45, 1}, {1, 1, 1}, {9, 130, 3}, {256, 256, 16}, {33, 17, 33}, {20, 12, 7}};
  const size_t block_shapes[][2] = {{1, 1}, {2, 1}, {4, 1}, {8, 1}, {1, 2}, {1, 4}, {1, 8}, {1, 16}};
  const double densities[] = {0.0, 0.1, 0.5, 1.0};
  int passed = 0, failed = 0;
  for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
    for (size_t bi = 0; bi < sizeof(block_shapes) / sizeof(block_shapes[0]); bi++)
      for (size_t di = 0; di < 4; di++)
        for (int mode = 0; mode < 2; mode++) {
          size_t R = block_shapes[bi][0], C = block_shapes[bi][1];
          size_t out = shapes[s][0], in = shapes[s][1] + (C - shapes[s][1] % C) % C, n = shapes[s][2];
          packed p = make_blocks(out, in, R, C, densities[di], mode);
          float* bias = malloc(out * sizeof(float));
          for (size_t o = 0; o < out; o++) bias[o] = frand();
          /* +1: misaligned by one float on purpose */
          float* xbuf = malloc((n * in + 2) * sizeof(float));
          float* ybuf = malloc((n * out + 2) * sizeof(float));
          float* x = xbuf + 1;
          float* y = ybuf + 1;
          for (size_t i = 0; i < n * in; i++) x[i] = frand();
          double* want_lin = calloc(n * out, sizeof(double));
          double* want_conv = calloc(out * n, sizeof(double));
          for (size_t row = 0; row < n; row++)
            for (size_t o = 0; o < out; o++) {
              double acc = bias[o];
              for (size_t c = 0; c < in; c++) acc += (double)p.dense[o * in + c] * x[row * in + c];
              want_lin[row * out + o] = acc;
            }
          /* conv reads x as [in, pixels] with pixels = n */
          for (size_t o = 0; o < out; o++)
            for (size_t px = 0; px < n; px++) {
              double acc = bias[o];
              for (size_t c = 0; c < in; c++) acc += (double)p.dense[o * in + c] * x[c * n + px];
              want_conv[o * n + px] = acc;
            }
          es_bcsr_f32 w = {out, in, R, C, p.values, p.col, p.ptr, bias};
          for (size_t isa = 0; isa < NISAS; isa++) {
            if (es_force_isa(ISAS[isa]) != 0) continue;
            char what[160];
            snprintf(what, sizeof what, "%s linear out=%zu in=%zu n=%zu %zux%zu density=%.1f mode=%d", ISAS[isa], out, in, n, R, C, densities[di], mode);
            ybuf[0] = ybuf[n * out + 1] = 12345.0f;
            es_f32_bcsr_linear(&w, n, x, y);
            int ok = close_enough(y, want_lin, n * out, what) && ybuf[0] == 12345.0f && ybuf[n * out + 1] == 12345.0f;
            ok ? passed++ : failed++;
            snprintf(what, sizeof what, "%s conv1x1 out=%zu in=%zu px=%zu %zux%zu density=%.1f mode=%d", ISAS[isa], out, in, n, R, C, densities[di], mode);
            es_f32_bcsr_conv1x1_nchw(&w, n, x, y);
            ok = close_enough(y, want_conv, out * n, what) && ybuf[0] == 12345.0f && ybuf[n * out + 1] == 12345.0f;
            ok ? passed++ : failed++;
            /* split row blocks, as a thread pool would: same result */
            size_t blocks = es_bcsr_row_blocks(&w), cut1 = blocks / 3, cut2 = (2 * blocks) / 3;
            es_f32_bcsr_linear_blocks(&w, n, x, y, cut2, blocks);
            es_f32_bcsr_linear_blocks(&w, n, x, y, 0, cut1);
            es_f32_bcsr_linear_blocks(&w, n, x, y, cut1, cut2);
            snprintf(what, sizeof what, "%s linear split out=%zu in=%zu %zux%zu", ISAS[isa], out, in, R, C);
            close_enough(y, want_lin, n * out, what) ? passed++ : failed++;
            es_f32_bcsr_conv1x1_nchw_blocks(&w, n, x, y, cut1, blocks);
            es_f32_bcsr_conv1x1_nchw_blocks(&w, n, x, y, 0, cut1);
            snprintf(what, sizeof what, "%s conv1x1 split out=%zu in=%zu %zux%zu", ISAS[isa], out, in, R, C);
            close_enough(y, want_conv, out * n, what) ? passed++ : failed++;
            /* without bias */
            w.bias = NULL;
            es_f32_bcsr_linear(&w, n, x, y);
            for (size_t row = 0; row < n; row++)
              for (size_t o = 0; o < out; o++) want_lin[row * out + o] -= bias[o];
            snprintf(what, sizeof what, "%s linear no-bias out=%zu in=%zu %zux%zu", ISAS[isa], out, in, R, C);
            close_enough(y, want_lin, n * out, what) ? passed++ : failed++;
            for (size_t row = 0; row < n; row++)
              for (size_t o = 0; o < out; o++) want_lin[row * out + o] += bias[o];
            w.bias = bias;
          }
          es_force_isa(NULL);
          free(p.values); free(p.col); free(p.ptr); free(p.dense); free(bias);
          free(xbuf); free(ybuf); free(want_lin); free(want_conv);
        }
  nm_tests(&passed, &failed);
  fused_tests(&passed, &failed);
  dwconv_tests(&passed, &failed);
  actsparse_tests(&passed, &failed);
  gated_tests(&passed, &failed);
  qs8_tests(&passed, &failed);
  qs8_conv_tests(&passed, &failed);
  qs8_chain_tests(&passed, &failed);
  qs8_actsparse_tests(&passed, &failed);
  printf("dispatch picks: %s\n", es_f32_bcsr_isa());
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
