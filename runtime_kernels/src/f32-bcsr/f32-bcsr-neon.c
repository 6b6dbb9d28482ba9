/* f32 BCSR RxC kernels, neon build (vectors of 4 floats). */
#define ES_ISA neon
#define ES_MR 4
#include "f32-bcsr.inc"
