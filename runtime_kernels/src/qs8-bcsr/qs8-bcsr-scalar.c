/* int8 BCSR Rx1 linear and static int8 1x1 conv references (blocks in groups of four, see
 * kernels.h): plain loops over int32 accumulators, and the per-row dynamic activation quantizer
 * every variant shares. */
#include <math.h>
#include <stdlib.h>

#include "edgesparse/kernels.h"

void es_qs8_bcsr_linear__scalar(const es_bcsr_qs8* w, size_t n, const int8_t* xq, const float* x_scale, float* y,
                                int32_t* acc_out, size_t b0, size_t b1) {
  const size_t R = w->block_rows;
  int32_t acc[8];
  for (size_t row = 0; row < n; row++)
    for (size_t b = b0; b < b1; b++) {
      for (size_t r = 0; r < R; r++) acc[r] = 0;
      for (int32_t k = w->row_ptr[b]; k < w->row_ptr[b + 1]; k += 4) /* a group of four blocks */
        for (size_t j = 0; j < 4; j++)
          for (size_t r = 0; r < R; r++)
            acc[r] += (int32_t)w->values[(size_t)k * R + r * 4 + j] * xq[row * w->in + w->col_idx[k + j]];
      for (size_t r = 0; r < R && b * R + r < w->out; r++) {
        const size_t o = b * R + r;
        if (acc_out)
          acc_out[row * w->out + o] = acc[r];
        else
          y[row * w->out + o] = (float)acc[r] * (w->scales[o] * x_scale[row]) + (w->bias ? w->bias[o] : 0.0f);
      }
    }
}

void es_qs8_quantize_rows__scalar(size_t n, size_t in, const float* x, int8_t* xq, float* x_scale) {
  for (size_t row = 0; row < n; row++) {
    const float* xr = x + row * in;
    float amax = 0.0f;
    for (size_t c = 0; c < in; c++) amax = fmaxf(amax, fabsf(xr[c]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (size_t c = 0; c < in; c++) {
      float q = nearbyintf(xr[c] * inv);  /* round half to even, as torch.round */
      q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
      xq[row * in + c] = (int8_t)q;
    }
    x_scale[row] = scale;
  }
}

void es_qs8_bcsr_conv1x1_nchw__scalar(const es_bcsr_qs8* w, const es_qs8_requant* q, size_t pixels, const int8_t* x,
                                      int8_t* y, size_t b0, size_t b1) {
  const size_t R = w->block_rows;
  int32_t acc[8];
  for (size_t b = b0; b < b1; b++)
    for (size_t p = 0; p < pixels; p++) {
      for (size_t r = 0; r < R; r++) acc[r] = 0;
      for (int32_t k = w->row_ptr[b]; k < w->row_ptr[b + 1]; k += 4)
        for (size_t j = 0; j < 4; j++) {
          const int32_t xv = x[(size_t)w->col_idx[k + j] * pixels + p];
          for (size_t r = 0; r < R; r++) acc[r] += (int32_t)w->values[(size_t)k * R + r * 4 + j] * xv;
        }
      for (size_t r = 0; r < R && b * R + r < w->out; r++) {
        const size_t o = b * R + r;
        y[o * pixels + p] = es_qs8_requantize(acc[r] + (q->bias ? q->bias[o] : 0), q->mult[o], q);
      }
    }
}
