/* f32 activation-sparse linear, avx512 build (vectors of 16 floats). */
#define ES_ISA avx512
#define ES_MR 16
#include "f32-actsparse.inc"
