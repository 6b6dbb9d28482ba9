/* f32 depthwise 3x3 NCHW kernel, avx2 build (vectors of 8 floats). */
#define ES_ISA avx2
#define ES_VL 8
#include "f32-dwconv.inc"
