/* static int8 depthwise 3x3 and add, NEON dotprod build (the NEON code; the ISA row it belongs to). */
#define ES_ISA neondot
#include "qs8-chain.inc"
