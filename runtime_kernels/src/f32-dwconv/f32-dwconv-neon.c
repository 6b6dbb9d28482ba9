/* f32 depthwise 3x3 NCHW kernel, neon build (vectors of 4 floats). */
#define ES_ISA neon
#define ES_VL 4
#include "f32-dwconv.inc"
