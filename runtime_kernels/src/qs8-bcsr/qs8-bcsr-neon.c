/* int8 BCSR Rx1 linear, neon build. */
#define ES_ISA neon
#include "qs8-bcsr.inc"
