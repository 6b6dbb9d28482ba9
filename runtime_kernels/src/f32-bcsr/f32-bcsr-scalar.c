/* f32 BCSR RxC reference kernels: plain loops, the twin every SIMD variant is tested against. */
#include "edgesparse/kernels.h"

void es_f32_bcsr_linear__scalar(const es_bcsr_f32* w, size_t n, const float* x, float* y, size_t b0, size_t b1) {
  const size_t R = w->block_rows, C = w->block_cols;
  for (size_t row = 0; row < n; row++) {
    for (size_t o = b0 * R; o < b1 * R && o < w->out; o++) y[row * w->out + o] = w->bias ? w->bias[o] : 0.0f;
    for (size_t b = b0; b < b1; b++)
      for (int32_t k = w->row_ptr[b]; k < w->row_ptr[b + 1]; k++)
        for (size_t r = 0; r < R && b * R + r < w->out; r++)
          for (size_t j = 0; j < C; j++)
            y[row * w->out + b * R + r] += w->values[((size_t)k * R + r) * C + j] * x[row * w->in + w->col_idx[k] + j];
  }
}

void es_f32_bcsr_conv1x1_nchw__scalar(const es_bcsr_f32* w, size_t pixels, const float* x, float* y, size_t b0,
                                      size_t b1) {
  const size_t R = w->block_rows, C = w->block_cols;
  for (size_t o = b0 * R; o < b1 * R && o < w->out; o++)
    for (size_t p = 0; p < pixels; p++) y[o * pixels + p] = w->bias ? w->bias[o] : 0.0f;
  for (size_t b = b0; b < b1; b++)
    for (int32_t k = w->row_ptr[b]; k < w->row_ptr[b + 1]; k++)
      for (size_t r = 0; r < R && b * R + r < w->out; r++)
        for (size_t j = 0; j < C; j++)
          for (size_t p = 0; p < pixels; p++)
            y[(b * R + r) * pixels + p] +=
                w->values[((size_t)k * R + r) * C + j] * x[((size_t)w->col_idx[k] + j) * pixels + p];
}

void es_f32_bcsr_conv1x1_nchw_fused__scalar(const es_bcsr_f32* w, const es_epilogue_f32* e, size_t pixels,
                                            const float* x, float* y, size_t b0, size_t b1) {
  es_f32_bcsr_conv1x1_nchw__scalar(w, pixels, x, y, b0, b1);
  for (size_t o = b0 * w->block_rows; o < b1 * w->block_rows && o < w->out; o++)
    for (size_t p = 0; p < pixels; p++) {
      float v = y[o * pixels + p] + (e->residual ? e->residual[o * pixels + p] : 0.0f);
      y[o * pixels + p] = v < e->min ? e->min : (v > e->max ? e->max : v);
    }
}
