/* Activation sparsity on int8 weights, neon build (vectors of 4 floats). */
#define ES_ISA neon
#define ES_MR 4
#include "qs8-actsparse.inc"
