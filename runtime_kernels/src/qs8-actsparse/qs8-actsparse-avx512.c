/* Activation sparsity on int8 weights, avx512 build (vectors of 16 floats). */
#define ES_ISA avx512
#define ES_MR 16
#include "qs8-actsparse.inc"
