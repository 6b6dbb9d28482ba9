/* int8 BCSR Rx1 linear, NEON dotprod build (sdot; ARMv8.2 cores such as Cortex-A55/A76). */
#define ES_ISA neondot
#include "qs8-bcsr.inc"
