/* static int8 depthwise 3x3 and add, neon build (vectorized by the compiler). */
#define ES_ISA neon
#include "qs8-chain.inc"
