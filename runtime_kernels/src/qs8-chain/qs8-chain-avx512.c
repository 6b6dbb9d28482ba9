/* static int8 depthwise 3x3 and add, avx512 build (vectorized by the compiler). */
#define ES_ISA avx512
#include "qs8-chain.inc"
