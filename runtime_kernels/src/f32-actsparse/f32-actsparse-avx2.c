/* f32 activation-sparse linear, avx2 build (vectors of 8 floats). */
#define ES_ISA avx2
#define ES_MR 8
#include "f32-actsparse.inc"
