/* The sizes of _kernels.h's filters and states, and what the _kernels module exports to other compiled modules
 * (telephony_bridge/_caller_path.c): its functions through a capsule, so that they run with the one set of
 * tables and taps kernels.py configured, not a copy of their own. Include <Python.h> first.
 */
#ifndef TELEPHONY_BRIDGE_KERNELS_CAPI_H
#define TELEPHONY_BRIDGE_KERNELS_CAPI_H

#include <stdint.h>

#define UP_TAPS 38       /* the upsampler's odd-offset taps (doubled) */
#define UP_HISTORY 37    /* its last inputs */
#define UP_COPY_FROM 19  /* resample._COPY_FROM: where the centre-tap phase reads in hist ++ input */
#define DOWN_TAPS 38     /* the downsampler's odd-offset taps */
#define DOWN_HISTORY 75  /* its last inputs */
#define DOWN_CENTRE 37
#define BLOCK 64         /* outputs computed per pass over the taps: a stack buffer, and loops that vectorise */

/* Upsampler state: int16 history[UP_HISTORY]. Downsampler state: int16 history[DOWN_HISTORY], then one byte:
 * 1 when the next input sample has an odd index in the call's stream. */
#define UP_STATE_BYTES (UP_HISTORY * 2)
#define DOWN_STATE_BYTES (DOWN_HISTORY * 2 + 1)

/* The doubles of scratch kernels_ulaw_up and kernels_down_ulaw need for n input samples. */
#define UP_WORK_DOUBLES(n) (UP_HISTORY + (n) + 1)
#define DOWN_WORK_DOUBLES(n, count) (DOWN_HISTORY + (n) + 1 + (count) + DOWN_TAPS)

typedef struct {
    /* kernels_ulaw_up, kernels_down_ulaw and kernels_down_count of _kernels.h */
    void (*ulaw_up)(uint8_t *state, const uint8_t *in, Py_ssize_t n, int16_t *s8, uint8_t *out, double *buf);
    void (*down_ulaw)(uint8_t *state, const uint8_t *in, Py_ssize_t n, uint8_t *out, double *buf);
    Py_ssize_t (*down_count)(const uint8_t *state, Py_ssize_t n);
    const int *configured; /* nonzero once configure() has set the tables: check before each use */
} KernelsCAPI;

#define KERNELS_CAPSULE "telephony_bridge.audio._kernels.C_API" /* PyCapsule_Import's name */

#endif
