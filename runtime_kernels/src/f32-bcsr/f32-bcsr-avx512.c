/* f32 BCSR RxC kernels, avx512 build (vectors of 16 floats). */
#define ES_ISA avx512
#define ES_MR 16
#include "f32-bcsr.inc"
