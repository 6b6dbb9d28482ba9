/* f32 depthwise 3x3 NCHW kernel, avx512 build (vectors of 16 floats). */
#define ES_ISA avx512
#define ES_VL 16
#include "f32-dwconv.inc"
