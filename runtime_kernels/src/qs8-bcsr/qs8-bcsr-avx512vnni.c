/* int8 BCSR Rx1 linear, AVX-512 VNNI build (vpdpbusd on 256-bit registers: AVX512VL). */
#define ES_ISA avx512vnni
#define ES_QS8_VNNI 1
#include "qs8-bcsr.inc"
