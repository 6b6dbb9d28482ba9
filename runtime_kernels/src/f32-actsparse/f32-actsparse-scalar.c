/* f32 activation-sparse linear reference: plain loops, the twin the SIMD variants are tested against. */
#include <math.h>

#include "edgesparse/kernels.h"

void es_f32_actsparse_linear__scalar(const es_actsparse_f32* w, float threshold, size_t n, const float* x, float* y,
                                     size_t o0, size_t o1) {
  for (size_t row = 0; row < n; row++) {
    for (size_t o = o0; o < o1; o++) y[row * w->out + o] = w->bias ? w->bias[o] : 0.0f;
    for (size_t c = 0; c < w->in; c++) {
      const float v = x[row * w->in + c];
      if (fabsf(v) <= threshold) continue;
      for (size_t o = o0; o < o1; o++) y[row * w->out + o] += v * w->weight_t[c * w->out + o];
    }
  }
}
