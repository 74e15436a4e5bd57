/* The numbers of _kernels.c without its Python objects: the tables, the taps and the two filters, so that other C
 * code (bench/relay_floor_c.pyx, which carries a call's frames in C) runs the very same sums. _kernels.c wraps
 * them for Python; what it says about exactness holds here. Include <Python.h> first (for Py_ssize_t).
 *
 * Everything is static: each translation unit that includes this has its own tables, set by its own
 * kernels_set() with the ones kernels.py hands _kernels.configure().
 */
#ifndef TELEPHONY_BRIDGE_KERNELS_H
#define TELEPHONY_BRIDGE_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_kernels_capi.h" /* the sizes, and what the module exports to other C */

/* x86-64's baseline (SSE2) has vectors of two doubles and no instruction for nearbyint, which then costs a libm
 * call a sample. Where the compiler can target AVX2, each filter is built twice, the second for AVX2 and FMA
 * (vectors of four, nearbyint one instruction, fused multiply-adds), and kernels_set() runs the AVX2 build on a
 * CPU that has it (docs/performance.md, "The filters built for AVX2"). The two give the same bytes: every product
 * of a tap and a sample is exact (kernels_set), so a fused multiply-add rounds as the add alone would, and both
 * builds add in the same order. Not with Apple's toolchain or MSVC-style drivers, whose runtimes lack what
 * __builtin_cpu_supports needs: the baseline alone there. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__) && !defined(_MSC_VER)
#define KERNELS_AVX2 1
#define KERNELS_INLINE static inline __attribute__((always_inline)) /* into each build, compiled for its target */
#else
#define KERNELS_INLINE static inline
#endif
enum { KERNELS_BASELINE = 0, KERNELS_AVX2_FMA = 1 };
static int kernels_isa = KERNELS_BASELINE; /* the build the filters run */

static double up_taps[UP_TAPS];
static double down_taps[DOWN_TAPS];
static int16_t ulaw_decode[256];
static uint8_t ulaw_encode[65536];
static int configured = 0;

/* A native int16 at any address: the buffers callers hand us (a state bytearray, a numpy view made with an
 * odd byte offset) need not be 2-byte aligned, and a cast pointer would let the compiler assume they are.
 * memcpy of two bytes compiles to a plain load or store. */
KERNELS_INLINE int16_t load_i16(const void *p) {
    int16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

KERNELS_INLINE void store_i16(void *p, int16_t v) { memcpy(p, &v, sizeof v); }

KERNELS_INLINE int16_t saturate(double v) {
    v = nearbyint(v); /* half to even, as numpy's rint */
    if (v > 32767.0) return 32767;
    if (v < -32768.0) return -32768;
    return (int16_t)v;
}

/* acc[j] += the symmetric FIR taps[0..HALF) (mirrored) over x[j .. j + 2 * HALF - 1], for j < count. Taps are
 * symmetric (kernels_set() checks), so each pair of samples shares one multiply; x is contiguous, so the loop
 * over j vectorises. */
#define HALF (UP_TAPS / 2)
_Static_assert(UP_TAPS == DOWN_TAPS && UP_TAPS % 2 == 0, "both filters share fir_symmetric");
KERNELS_INLINE void fir_symmetric(const double *x, Py_ssize_t count, const double *taps, double *acc) {
    for (int k = 0; k < HALF; k++) {
        double t = taps[k];
        const double *lo = x + k, *hi = x + 2 * HALF - 1 - k;
        for (Py_ssize_t j = 0; j < count; j++) acc[j] += t * (lo[j] + hi[j]);
    }
}

/* Whether this build and this CPU can run the filters' build ``isa``. */
static int kernels_can_run(int isa) {
    if (isa == KERNELS_BASELINE) return 1;
#ifdef KERNELS_AVX2
    if (isa == KERNELS_AVX2_FMA) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
    return 0;
}

/* The taps (``up`` doubled: the upsampler's gain of 2) and the μ-law tables: NULL once set, or why they were
 * refused (nothing is then configured). */
static const char *kernels_set(const double *up, const double *down, const void *decode, const void *encode) {
    configured = 0;
    for (int k = 0; k < HALF; k++) {
        if (up[k] != up[UP_TAPS - 1 - k] || down[k] != down[DOWN_TAPS - 1 - k])
            return "expected symmetric (linear-phase) taps";
    }
    /* What makes every sum exact, whatever the order of the additions: taps under 1 (2 for the upsampler's
     * doubled ones) in multiples of 2**-32. */
    for (int k = 0; k < UP_TAPS; k++) {
        double u = up[k] * 4294967296.0, d = down[k] * 4294967296.0;
        if (u != nearbyint(u) || d != nearbyint(d) || fabs(up[k]) >= 2.0 || fabs(down[k]) >= 1.0)
            return "expected taps under 1 in multiples of 2**-32 (see resample.py)";
    }
    memcpy(up_taps, up, sizeof(up_taps));
    memcpy(down_taps, down, sizeof(down_taps));
    memcpy(ulaw_decode, decode, sizeof(ulaw_decode));
    memcpy(ulaw_encode, encode, sizeof(ulaw_encode));
    kernels_isa = kernels_can_run(KERNELS_AVX2_FMA) ? KERNELS_AVX2_FMA : KERNELS_BASELINE;
    configured = 1;
    return NULL;
}

/* kernels_ulaw_up's body (below), inlined into each build. */
KERNELS_INLINE void ulaw_up_body(uint8_t *state, const uint8_t *in, Py_ssize_t n, int16_t *s8, uint8_t *out,
                                 double *buf /* history ++ input, as doubles: the inner loops then vectorise */) {
    const uint8_t *history = state;
    for (int i = 0; i < UP_HISTORY; i++) buf[i] = load_i16(history + 2 * i);
    for (Py_ssize_t i = 0; i < n; i++) buf[UP_HISTORY + i] = s8[i] = ulaw_decode[in[i]];
    double acc[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t count = n - start < BLOCK ? n - start : BLOCK;
        const double *x = buf + start;
        for (Py_ssize_t j = 0; j < count; j++) acc[j] = 0.0;
        fir_symmetric(x, count, up_taps, acc);
        for (Py_ssize_t j = 0; j < count; j++) {
            Py_ssize_t m = start + j;
            uint16_t filtered = (uint16_t)saturate(acc[j]);
            uint16_t copied = (uint16_t)(int16_t)buf[UP_COPY_FROM + m];
            uint8_t *o = out + 4 * m;
            o[0] = filtered & 0xFF;
            o[1] = filtered >> 8;
            o[2] = copied & 0xFF;
            o[3] = copied >> 8;
        }
    }
    uint8_t *keep = state;
    for (int i = 0; i < UP_HISTORY; i++) store_i16(keep + 2 * i, (int16_t)buf[n + i]);
}

/* The μ-law bytes kernels_down_ulaw makes of n samples, given its state: one per odd-index sample in. */
static inline Py_ssize_t kernels_down_count(const uint8_t *state, Py_ssize_t n) {
    Py_ssize_t first = state[DOWN_HISTORY * 2] ? 0 : 1;
    return n >= first ? (n - first + 1) / 2 : 0;
}

/* kernels_down_ulaw's body (below), inlined into each build. */
KERNELS_INLINE void down_ulaw_body(uint8_t *state, const uint8_t *in, Py_ssize_t n, uint8_t *out,
                                   double *buf /* history ++ input, as doubles; then its even-offset samples */) {
    uint8_t *st = state;
    int odd_next = st[DOWN_HISTORY * 2];
    Py_ssize_t first = odd_next ? 0 : 1;
    Py_ssize_t count = kernels_down_count(state, n);
    for (int i = 0; i < DOWN_HISTORY; i++) buf[i] = load_i16(st + 2 * i);
    for (Py_ssize_t i = 0; i < n; i++) buf[DOWN_HISTORY + i] = (int16_t)(uint16_t)(in[2 * i] | (in[2 * i + 1] << 8));
    /* Output i is the sinc taps over buf[first + 2i + 2k] (k < DOWN_TAPS) plus half of buf[first + 2i + 37]: the
     * even-offset samples are gathered first, so the filter reads them contiguously. */
    double *even = buf + DOWN_HISTORY + n + 1;
    for (Py_ssize_t i = 0; i < count + DOWN_TAPS - 1; i++) even[i] = buf[first + 2 * i];
    double acc[BLOCK];
    for (Py_ssize_t start = 0; start < count; start += BLOCK) {
        Py_ssize_t c = count - start < BLOCK ? count - start : BLOCK;
        const double *centre = buf + first + DOWN_CENTRE + 2 * start;
        for (Py_ssize_t j = 0; j < c; j++) acc[j] = centre[2 * j] * 0.5;
        fir_symmetric(even + start, c, down_taps, acc);
        for (Py_ssize_t j = 0; j < c; j++) out[start + j] = ulaw_encode[(uint16_t)saturate(acc[j])];
    }
    for (int i = 0; i < DOWN_HISTORY; i++) store_i16(st + 2 * i, (int16_t)buf[n + i]);
    st[DOWN_HISTORY * 2] = odd_next ^ (n & 1);
}

/* The filters, each built for the baseline and (where it can be) for AVX2, and run as ``kernels_isa`` says. */
static void ulaw_up_baseline(uint8_t *state, const uint8_t *in, Py_ssize_t n, int16_t *s8, uint8_t *out,
                             double *buf) {
    ulaw_up_body(state, in, n, s8, out, buf);
}

static void down_ulaw_baseline(uint8_t *state, const uint8_t *in, Py_ssize_t n, uint8_t *out, double *buf) {
    down_ulaw_body(state, in, n, out, buf);
}

#ifdef KERNELS_AVX2
__attribute__((target("avx2,fma"))) static void ulaw_up_avx2(uint8_t *state, const uint8_t *in, Py_ssize_t n,
                                                             int16_t *s8, uint8_t *out, double *buf) {
    ulaw_up_body(state, in, n, s8, out, buf);
}

__attribute__((target("avx2,fma"))) static void down_ulaw_avx2(uint8_t *state, const uint8_t *in, Py_ssize_t n,
                                                               uint8_t *out, double *buf) {
    down_ulaw_body(state, in, n, out, buf);
}
#endif

/* n μ-law bytes in; s8: n native int16 (decoded); out: 4n bytes, little-endian PCM16 upsampled 2x (exactly two
 * samples out per sample in). state: UP_STATE_BYTES, updated; buf: UP_WORK_DOUBLES(n) of scratch. */
static void kernels_ulaw_up(uint8_t *state, const uint8_t *in, Py_ssize_t n, int16_t *s8, uint8_t *out, double *buf) {
#ifdef KERNELS_AVX2
    if (kernels_isa == KERNELS_AVX2_FMA) {
        ulaw_up_avx2(state, in, n, s8, out, buf);
        return;
    }
#endif
    ulaw_up_baseline(state, in, n, s8, out, buf);
}

/* n little-endian PCM16 samples at 16 kHz in (2n bytes), low-passed, halved and μ-law encoded into out
 * (kernels_down_count(state, n) bytes). state: DOWN_STATE_BYTES, updated; buf: DOWN_WORK_DOUBLES(n, count). */
static void kernels_down_ulaw(uint8_t *state, const uint8_t *in, Py_ssize_t n, uint8_t *out, double *buf) {
#ifdef KERNELS_AVX2
    if (kernels_isa == KERNELS_AVX2_FMA) {
        down_ulaw_avx2(state, in, n, out, buf);
        return;
    }
#endif
    down_ulaw_baseline(state, in, n, out, buf);
}

#endif
