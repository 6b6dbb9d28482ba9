/* int8 BCSR Rx1 linear, avx2 build. */
#define ES_ISA avx2
#include "qs8-bcsr.inc"
