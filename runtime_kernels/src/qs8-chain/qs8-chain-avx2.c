/* static int8 depthwise 3x3 and add, avx2 build (vectorized by the compiler). */
#define ES_ISA avx2
#include "qs8-chain.inc"
