/* static int8 depthwise 3x3 and add, AVX-512 VNNI build (vpdpbusd taps). */
#define ES_ISA avx512vnni
#include "qs8-chain.inc"
