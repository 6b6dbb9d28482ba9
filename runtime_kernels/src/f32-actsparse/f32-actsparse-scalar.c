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
      for (size_t o = o0; o < o1; o++) y[row * w->out + o] += v * w->weight_t[c * (w->stride ? w->stride : w->out) + o];
    }
  }
}

void es_f32_gated_mlp_hidden__scalar(const es_gated_mlp_f32* w, float threshold, size_t n, const float* x, float* h,
                                     size_t i0, size_t i1) {
  for (size_t row = 0; row < n; row++)
    for (size_t i = i0; i < i1; i++) {
      float g = w->gate_bias ? w->gate_bias[i] : 0.0f, u = w->up_bias ? w->up_bias[i] : 0.0f;
      for (size_t c = 0; c < w->in; c++) {
        g += w->gate[c * w->hidden + i] * x[row * w->in + c];
        u += w->bundle[i * (w->in + w->out) + c] * x[row * w->in + c];
      }
      const float a = w->act == ES_ACT_RELU ? (g > 0.0f ? g : 0.0f) : g / (1.0f + expf(-g));
      h[row * w->hidden + i] = fabsf(a) > (w->thresholds ? w->thresholds[i] : threshold) ? a * u : 0.0f;
    }
}
