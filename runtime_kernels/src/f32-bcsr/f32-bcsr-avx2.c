/* f32 BCSR RxC kernels, avx2 build (vectors of 8 floats). */
#define ES_ISA avx2
#define ES_MR 8
#include "f32-bcsr.inc"
