/* Dropout masks drawn from a counter-based generator: the mask of element i is a pure function of
 * (seed, i), so a branch keeps only the seed and rebuilds the mask wherever it needs it (forward x ⊙ m,
 * backward ∂x ⊙ m and x ⊙ m for ∂A) in one pass, with no mask tensor in memory.
 *
 * Elements 2j and 2j+1 take the low and the high signed 16-bit lane of
 *     h(j) = lowbias32(lowbias32(j · 0x9E3779B9 ⊕ k0) + k1),   k0, k1 = low, high 32 bits of the seed
 * (lowbias32: C. Wellons' 32-bit integer hash, xorshift-multiply ×2); an element is dropped when its
 * lane < thr (thr = round(p · 2^16) − 2^15, the lane rule of layers/dropout.py's keep_mask). Two keyed
 * rounds, so streams of different seeds are not shifted copies of each other.
 *
 * Kept elements are copied bit for bit (no scaling: the branch applies 1/(1−p) to the rank-sized
 * product), so one function serves every dtype of a width. The loops are written for the vectorizer
 * (32-bit multiplies only: AVX2 has no 64-bit one); target_clones adds an AVX2 build of each, chosen
 * at load time by the CPU, next to the baseline x86-64 one.
 */
#include <stdint.h>

#pragma GCC optimize("O3")

#define LK_ABI 2

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LK_CLONES
#endif

int lk_dropout_abi(void) { return LK_ABI; }

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352DU;
    x ^= x >> 15;
    x *= 0x846CA68BU;
    x ^= x >> 16;
    return x;
}

static inline uint32_t lanes(uint32_t k0, uint32_t k1, uint32_t j) {
    return lowbias32(lowbias32(j * 0x9E3779B9U ^ k0) + k1);
}

/* all ones when the lane keeps its element */
static inline uint32_t keep_lo(uint32_t h, int32_t thr) { return 0u - (uint32_t)((int32_t)(int16_t)(h & 0xFFFFu) >= thr); }
static inline uint32_t keep_hi(uint32_t h, int32_t thr) { return 0u - (uint32_t)((int32_t)(int16_t)(h >> 16) >= thr); }

/* out[i] = keep(i) ? in[i] : 0, 4-byte elements; in and out do not overlap */
LK_CLONES void lk_drop32(const uint32_t *restrict in, uint32_t *restrict out, int64_t n, uint64_t seed, int32_t thr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        out[2 * j] = in[2 * j] & keep_lo(h, thr);
        out[2 * j + 1] = in[2 * j + 1] & keep_hi(h, thr);
    }
    if (n % 2) out[n - 1] = in[n - 1] & keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* the same in place */
LK_CLONES void lk_drop32_inplace(uint32_t *restrict x, int64_t n, uint64_t seed, int32_t thr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        x[2 * j] &= keep_lo(h, thr);
        x[2 * j + 1] &= keep_hi(h, thr);
    }
    if (n % 2) x[n - 1] &= keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* 2-byte elements (bf16, fp16); in and out may be the same buffer (the loop reads before it writes) */
LK_CLONES void lk_drop16(const uint16_t *in, uint16_t *out, int64_t n, uint64_t seed, int32_t thr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        uint16_t a = in[2 * j], b = in[2 * j + 1];
        out[2 * j] = a & (uint16_t)keep_lo(h, thr);
        out[2 * j + 1] = b & (uint16_t)keep_hi(h, thr);
    }
    if (n % 2) out[n - 1] = in[n - 1] & (uint16_t)keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* keep[i] = 1 if element i is kept, else 0 (a bool mask, for code that wants it dense) */
LK_CLONES void lk_keep8(uint8_t *restrict keep, int64_t n, uint64_t seed, int32_t thr) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        keep[2 * j] = (uint8_t)(keep_lo(h, thr) & 1u);
        keep[2 * j + 1] = (uint8_t)(keep_hi(h, thr) & 1u);
    }
    if (n % 2) keep[n - 1] = (uint8_t)(keep_lo(lanes(k0, k1, (uint32_t)pairs), thr) & 1u);
}
