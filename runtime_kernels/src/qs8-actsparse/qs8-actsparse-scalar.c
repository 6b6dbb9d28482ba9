/* Activation sparsity on int8 weights, reference: plain loops, the twin the SIMD variants are
 * tested against (and the integer reference of the dynamic-int8 flavour). */
#include <math.h>

#include "edgesparse/kernels.h"

void es_f32_qc8w_actsparse_linear__scalar(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x,
                                          float* y, size_t o0, size_t o1) {
  const size_t stride = w->stride ? w->stride : w->out;
  for (size_t row = 0; row < n; row++)
    for (size_t o = o0; o < o1; o++) {
      float acc = 0.0f;
      for (size_t c = 0; c < w->in; c++) {
        const float v = x[row * w->in + c];
        if (fabsf(v) > threshold) acc += v * w->weight_t[c * stride + o];
      }
      y[row * w->out + o] = acc * w->scales[o] + (w->bias ? w->bias[o] : 0.0f);
    }
}

void es_qs8_actsparse_linear__scalar(const es_actsparse_qc8w* w, float threshold, size_t n, const float* x,
                                     const int8_t* xq, const float* x_scale, float* y, size_t o0, size_t o1) {
  const size_t stride = w->stride ? w->stride : w->out;
  for (size_t row = 0; row < n; row++)
    for (size_t o = o0; o < o1; o++) {
      int32_t acc = 0;
      for (size_t c = 0; c < w->in; c++)
        if (fabsf(x[row * w->in + c]) > threshold) acc += (int32_t)xq[row * w->in + c] * w->weight_t[c * stride + o];
      y[row * w->out + o] = (float)acc * (w->scales[o] * x_scale[row]) + (w->bias ? w->bias[o] : 0.0f);
    }
}

void es_f32_qc8w_gated_mlp_hidden__scalar(const es_gated_mlp_qc8w* w, float threshold, size_t n, const float* x,
                                          float* h, size_t i0, size_t i1) {
  for (size_t row = 0; row < n; row++)
    for (size_t i = i0; i < i1; i++) {
      float g = 0.0f, u = 0.0f;
      for (size_t c = 0; c < w->in; c++) {
        g += w->gate_t[c * w->hidden + i] * x[row * w->in + c];
        u += w->bundle[i * (w->in + w->out) + c] * x[row * w->in + c];
      }
      g = g * w->gate_scales[i] + (w->gate_bias ? w->gate_bias[i] : 0.0f);
      const float a = w->act == ES_ACT_RELU ? (g > 0.0f ? g : 0.0f) : g / (1.0f + expf(-g));
      h[row * w->hidden + i] = fabsf(a) > (w->thresholds ? w->thresholds[i] : threshold)
                                   ? a * (u * w->up_scales[i] + (w->up_bias ? w->up_bias[i] : 0.0f))
                                   : 0.0f;
    }
}
