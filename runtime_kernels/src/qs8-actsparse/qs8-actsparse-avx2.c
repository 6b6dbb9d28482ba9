/* Activation sparsity on int8 weights, avx2 build (vectors of 8 floats). */
#define ES_ISA avx2
#define ES_MR 8
#include "qs8-actsparse.inc"
