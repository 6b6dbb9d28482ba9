/* f32 N:M kernels, avx512 build (vectors of 16 floats). */
#define ES_ISA avx512
#define ES_VL 16
#include "f32-nm.inc"
