/* f32 N:M kernels, neon build (vectors of 4 floats). */
#define ES_ISA neon
#define ES_VL 4
#include "f32-nm.inc"
