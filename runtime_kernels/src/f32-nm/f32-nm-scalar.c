/* f32 N:M reference kernels: plain loops, the twin every SIMD variant is tested against. */
#include "edgesparse/kernels.h"

void es_f32_nm_linear__scalar(const es_nm_f32* w, size_t rows, const float* x, float* y, size_t o0, size_t o1) {
  const size_t kept = w->in / w->m * w->n;
  for (size_t row = 0; row < rows; row++)
    for (size_t o = o0; o < o1; o++) {
      float acc = w->bias ? w->bias[o] : 0.0f;
      for (size_t k = 0; k < kept; k++) acc += w->values[o * kept + k] * x[row * w->in + k / w->n * w->m + w->idx[o * kept + k]];
      y[row * w->out + o] = acc;
    }
}

void es_f32_nm_conv1x1_nchw__scalar(const es_nm_f32* w, size_t pixels, const float* x, float* y, size_t o0, size_t o1) {
  const size_t kept = w->in / w->m * w->n;
  for (size_t o = o0; o < o1; o++)
    for (size_t p = 0; p < pixels; p++) {
      float acc = w->bias ? w->bias[o] : 0.0f;
      for (size_t k = 0; k < kept; k++)
        acc += w->values[o * kept + k] * x[(k / w->n * w->m + w->idx[o * kept + k]) * pixels + p];
      y[o * pixels + p] = acc;
    }
}
