/* f32 depthwise 3x3 NCHW reference kernel: plain loops with bounds checks (no scratch), the twin
 * every SIMD variant is tested against. */
#include "edgesparse/kernels.h"

void es_f32_dwconv3x3_nchw__scalar(const es_dwconv3x3_f32* w, size_t height, size_t width, const float* x, float* y,
                                   float* scratch, size_t c0, size_t c1) {
  (void)scratch;
  const size_t s = w->stride, oh = es_dwconv3x3_out_size(height, s), ow = es_dwconv3x3_out_size(width, s);
  for (size_t c = c0; c < c1; c++)
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++) {
        float acc = w->bias ? w->bias[c] : 0.0f;
        for (size_t ky = 0; ky < 3; ky++)
          for (size_t kx = 0; kx < 3; kx++) {
            const size_t iy = oy * s + ky, ix = ox * s + kx; /* padded coordinates: 0 is the pad */
            if (iy >= 1 && iy <= height && ix >= 1 && ix <= width)
              acc += w->weights[9 * c + 3 * ky + kx] * x[(c * height + iy - 1) * width + ix - 1];
          }
        y[(c * oh + oy) * ow + ox] = acc < w->min ? w->min : (acc > w->max ? w->max : acc);
      }
}
