/* f32 N:M kernels, avx2 build (vectors of 8 floats). */
#define ES_ISA avx2
#define ES_VL 8
#include "f32-nm.inc"
