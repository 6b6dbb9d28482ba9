/* Static int8 depthwise 3x3 and add references: plain loops with bounds checks (no scratch), the
 * twins every variant is tested against. */
#include "edgesparse/kernels.h"

void es_qs8_dwconv3x3_nchw_channels__scalar(const es_dwconv3x3_qs8* w, const es_qs8_requant* q, size_t height,
                                            size_t width, const int8_t* x, int8_t* y, int32_t* scratch, size_t c0,
                                            size_t c1) {
  (void)scratch;
  const size_t s = w->stride, oh = es_dwconv3x3_out_size(height, s), ow = es_dwconv3x3_out_size(width, s);
  for (size_t c = c0; c < c1; c++)
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++) {
        int32_t acc = q->bias ? q->bias[c] : 0;
        for (size_t ky = 0; ky < 3; ky++)
          for (size_t kx = 0; kx < 3; kx++) {
            const size_t iy = oy * s + ky, ix = ox * s + kx; /* padded coordinates: 0 is the pad */
            if (iy >= 1 && iy <= height && ix >= 1 && ix <= width)
              acc += w->weights[9 * c + 3 * ky + kx] * ((int32_t)x[(c * height + iy - 1) * width + ix - 1] - w->x_zp);
          }
        y[(c * oh + oy) * ow + ox] = es_qs8_requantize(acc, q->mult[c], q);
      }
}

void es_qs8_add__scalar(const es_qs8_add_params* p, size_t n, const int8_t* a, const int8_t* b, int8_t* y) {
  for (size_t i = 0; i < n; i++) {
    const float va = (float)((int32_t)a[i] - p->a_zp) * p->a_mult, vb = (float)((int32_t)b[i] - p->b_zp) * p->b_mult;
    y[i] = es_qs8_store(va + vb, &p->out);
  }
}
