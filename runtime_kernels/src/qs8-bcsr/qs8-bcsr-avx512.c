/* int8 BCSR Rx1 linear, avx512 build. */
#define ES_ISA avx512
#include "qs8-bcsr.inc"
