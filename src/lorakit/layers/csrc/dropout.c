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
 * product), so one function serves every dtype of a width.
 *
 * Two builds of each entry point, the same bits: portable C, and AVX2 intrinsics chosen at run time
 * when the CPU has AVX2. The hash costs 5–7× a memory pass (docs/PERFORMANCE.md), so the AVX2 build
 * is written out by hand rather than left to the vectorizer, which kept j in 64 bits and split the
 * lanes with a dozen shuffles: there, eight hashes (sixteen elements) are one vector of eight 32-bit
 * words, and since element 2j is the low and 2j+1 the high 16-bit half of word j, that vector read as
 * sixteen int16 lanes is already in element order — one 16-bit compare gives sixteen keep masks.
 * Non-x86 machines build the portable code only (as does -DLK_NO_SIMD, which is how that build is checked).
 */
#include <stdint.h>

#pragma GCC optimize("O3")

#define LK_ABI 3

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(LK_NO_SIMD)
#define LK_X86 1
#include <immintrin.h>
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

/* ---- portable build: elements [start, n), start even ------------------------------------------ */

/* out[i] = keep(i) ? in[i] : 0, 4-byte elements; in and out do not overlap */
static void drop32_c(const uint32_t *restrict in, uint32_t *restrict out, int64_t n, uint64_t seed, int32_t thr,
                     int64_t start) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = start / 2; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        out[2 * j] = in[2 * j] & keep_lo(h, thr);
        out[2 * j + 1] = in[2 * j + 1] & keep_hi(h, thr);
    }
    if (n % 2 && n > start) out[n - 1] = in[n - 1] & keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* the same in place */
static void drop32_inplace_c(uint32_t *restrict x, int64_t n, uint64_t seed, int32_t thr, int64_t start) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = start / 2; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        x[2 * j] &= keep_lo(h, thr);
        x[2 * j + 1] &= keep_hi(h, thr);
    }
    if (n % 2 && n > start) x[n - 1] &= keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* 2-byte elements (bf16, fp16); in and out may be the same buffer (the loop reads before it writes) */
static void drop16_c(const uint16_t *in, uint16_t *out, int64_t n, uint64_t seed, int32_t thr, int64_t start) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = start / 2; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        uint16_t a = in[2 * j], b = in[2 * j + 1];
        out[2 * j] = a & (uint16_t)keep_lo(h, thr);
        out[2 * j + 1] = b & (uint16_t)keep_hi(h, thr);
    }
    if (n % 2 && n > start) out[n - 1] = in[n - 1] & (uint16_t)keep_lo(lanes(k0, k1, (uint32_t)pairs), thr);
}

/* keep[i] = 1 if element i is kept, else 0 (a bool mask, for code that wants it dense) */
static void keep8_c(uint8_t *restrict keep, int64_t n, uint64_t seed, int32_t thr, int64_t start) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t pairs = n / 2;
    for (int64_t j = start / 2; j < pairs; j++) {
        uint32_t h = lanes(k0, k1, (uint32_t)j);
        keep[2 * j] = (uint8_t)(keep_lo(h, thr) & 1u);
        keep[2 * j + 1] = (uint8_t)(keep_hi(h, thr) & 1u);
    }
    if (n % 2 && n > start) keep[n - 1] = (uint8_t)(keep_lo(lanes(k0, k1, (uint32_t)pairs), thr) & 1u);
}

/* ---- AVX2 and AVX-512 builds ---------------------------------------------------------------------------- */
#ifdef LK_X86
#define LK_AVX2 __attribute__((target("avx2")))

/* lowbias32 on eight words */
LK_AVX2 static inline __m256i lowbias32_v(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352DU));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68BU));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* The masks of elements 2·j0 … 2·j0+15 as sixteen int16 lanes (all ones = keep), in element order.
 * keep ⇔ lane ≥ thr ⇔ lane > thr − 1; thr = −2¹⁵ (p = 0) keeps all and thr = 2¹⁵ none (lo/hi). */
typedef struct { __m256i k0, k1, step, thr1; int all, none; } Hash8;

LK_AVX2 static inline Hash8 hash8_init(uint64_t seed, int32_t thr) {
    Hash8 h;
    h.k0 = _mm256_set1_epi32((int)(uint32_t)seed);
    h.k1 = _mm256_set1_epi32((int)(uint32_t)(seed >> 32));
    h.step = _mm256_set1_epi32((int)(8u * 0x9E3779B9U));  /* j·C advanced by eight pairs, mod 2³² */
    h.all = thr <= -32768;
    h.none = thr > 32767;
    h.thr1 = _mm256_set1_epi16((short)(h.all || h.none ? 0 : thr - 1));
    return h;
}

/* jc: the eight pairs' j·0x9E3779B9 (kept incrementally by the loops: one multiply fewer) */
LK_AVX2 static inline __m256i keep16(const Hash8 *h, __m256i jc) {
    __m256i x = _mm256_xor_si256(jc, h->k0);
    x = lowbias32_v(_mm256_add_epi32(lowbias32_v(x), h->k1));
    if (h->all) return _mm256_set1_epi32(-1);
    if (h->none) return _mm256_setzero_si256();
    return _mm256_cmpgt_epi16(x, h->thr1);
}

LK_AVX2 static inline __m256i first_j(void) {  /* j·C for pairs 0…7 */
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)0x9E3779B9U));
}

/* 4-byte elements: 16 at a time, masks widened from 16 to 32 bits; out may be in (in place) */
LK_AVX2 static int64_t drop32_avx2(const uint32_t *in, uint32_t *out, int64_t n, uint64_t seed, int32_t thr) {
    Hash8 h = hash8_init(seed, thr);
    __m256i j = first_j();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16, j = _mm256_add_epi32(j, h.step)) {
        __m256i m = keep16(&h, j);
        __m256i m0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(m));
        __m256i m1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(m, 1));
        __m256i a = _mm256_loadu_si256((const __m256i *)(in + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(in + i + 8));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(a, m0));
        _mm256_storeu_si256((__m256i *)(out + i + 8), _mm256_and_si256(b, m1));
    }
    return i;  /* elements done; the caller finishes the tail (i is even: whole pairs) */
}

/* 2-byte elements: the sixteen int16 masks apply as they are */
LK_AVX2 static int64_t drop16_avx2(const uint16_t *in, uint16_t *out, int64_t n, uint64_t seed, int32_t thr) {
    Hash8 h = hash8_init(seed, thr);
    __m256i j = first_j();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16, j = _mm256_add_epi32(j, h.step)) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(in + i));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(a, keep16(&h, j)));
    }
    return i;
}

/* bytes 0/1: the int16 masks narrowed in order (packs within each 128-bit half, then the halves) */
LK_AVX2 static int64_t keep8_avx2(uint8_t *keep, int64_t n, uint64_t seed, int32_t thr) {
    Hash8 h = hash8_init(seed, thr);
    __m256i j = first_j(), one = _mm256_set1_epi16(1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16, j = _mm256_add_epi32(j, h.step)) {
        __m256i m = _mm256_and_si256(keep16(&h, j), one);
        __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        _mm_storeu_si128((__m128i *)(keep + i), b);
    }
    return i;
}

/* AVX-512 (F + BW): sixteen hashes, thirty-two elements, a 32-bit compare mask applied by masked moves */
#define LK_AVX512 __attribute__((target("avx512f,avx512bw")))

LK_AVX512 static inline __m512i lowbias32_z(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7FEB352DU));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68BU));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* the keep bits of elements 2·j … 2·j+31 for jc = j·C of sixteen pairs (bit t = element 2j + t) */
LK_AVX512 static inline __mmask32 keep32_z(__m512i jc, __m512i k0, __m512i k1, __m512i thr1, int all, int none) {
    __m512i x = lowbias32_z(_mm512_add_epi32(lowbias32_z(_mm512_xor_si512(jc, k0)), k1));
    return all ? (__mmask32)0xFFFFFFFFu : none ? (__mmask32)0 : _mm512_cmpgt_epi16_mask(x, thr1);
}

#define LK_Z_SETUP                                                                                   \
    __m512i k0 = _mm512_set1_epi32((int)(uint32_t)seed), k1 = _mm512_set1_epi32((int)(uint32_t)(seed >> 32)); \
    int all = thr <= -32768, none = thr > 32767;                                                     \
    __m512i thr1 = _mm512_set1_epi16((short)(all || none ? 0 : thr - 1));                            \
    __m512i step = _mm512_set1_epi32((int)(16u * 0x9E3779B9U));                                      \
    __m512i jc = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), \
                                    _mm512_set1_epi32((int)0x9E3779B9U));

LK_AVX512 static int64_t drop32_avx512(const uint32_t *in, uint32_t *out, int64_t n, uint64_t seed, int32_t thr) {
    LK_Z_SETUP
    int64_t i = 0;
    for (; i + 32 <= n; i += 32, jc = _mm512_add_epi32(jc, step)) {
        __mmask32 m = keep32_z(jc, k0, k1, thr1, all, none);
        __m512i a = _mm512_maskz_loadu_epi32((__mmask16)m, in + i);
        __m512i b = _mm512_maskz_loadu_epi32((__mmask16)(m >> 16), in + i + 16);
        _mm512_storeu_si512(out + i, a);
        _mm512_storeu_si512(out + i + 16, b);
    }
    return i;
}

LK_AVX512 static int64_t drop16_avx512(const uint16_t *in, uint16_t *out, int64_t n, uint64_t seed, int32_t thr) {
    LK_Z_SETUP
    int64_t i = 0;
    for (; i + 32 <= n; i += 32, jc = _mm512_add_epi32(jc, step))
        _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi16(keep32_z(jc, k0, k1, thr1, all, none), in + i));
    return i;
}

/* 0 portable, 1 AVX2, 2 AVX-512: the widest the CPU has, or less when lk_dropout_use() asked for less */
static int cpu_level(void) {
    static int known = -1;  /* a race here only computes the same answer twice */
    if (known < 0)
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2
                : __builtin_cpu_supports("avx2") ? 1 : 0;
    return known;
}
static int wanted = 2;
static int level(void) { return cpu_level() < wanted ? cpu_level() : wanted; }
#endif

/* Use at most build `want` (tests run every build the CPU has against each other); returns the one in use. */
int lk_dropout_use(int want) {
#ifdef LK_X86
    wanted = want;
    return level();
#else
    (void)want;
    return 0;
#endif
}

/* ---- entry points: the widest build for whole groups of 16 or 32 elements, the portable one for the
 * rest (it starts at an even element: whole pairs) ---- */
#ifdef LK_X86
#define LK_FAST(call) (level() >= 1 ? (call) : 0)
#define LK_FAST32(a, b) (level() == 2 ? drop32_avx512(a, b, n, seed, thr) : LK_FAST(drop32_avx2(a, b, n, seed, thr)))
#define LK_FAST16(a, b) (level() == 2 ? drop16_avx512(a, b, n, seed, thr) : LK_FAST(drop16_avx2(a, b, n, seed, thr)))
#else
#define LK_FAST(call) 0
#define LK_FAST32(a, b) 0
#define LK_FAST16(a, b) 0
#endif

/* out[i] = keep(i) ? in[i] : 0, 4-byte elements; in and out do not overlap */
void lk_drop32(const uint32_t *in, uint32_t *out, int64_t n, uint64_t seed, int32_t thr) {
    drop32_c(in, out, n, seed, thr, LK_FAST32(in, out));
}

/* the same in place */
void lk_drop32_inplace(uint32_t *x, int64_t n, uint64_t seed, int32_t thr) {
    drop32_inplace_c(x, n, seed, thr, LK_FAST32(x, x));
}

/* 2-byte elements (bf16, fp16); in and out may be the same buffer */
void lk_drop16(const uint16_t *in, uint16_t *out, int64_t n, uint64_t seed, int32_t thr) {
    drop16_c(in, out, n, seed, thr, LK_FAST16(in, out));
}

/* keep[i] = 1 if element i is kept, else 0 */
void lk_keep8(uint8_t *keep, int64_t n, uint64_t seed, int32_t thr) {
    keep8_c(keep, n, seed, thr, LK_FAST(keep8_avx2(keep, n, seed, thr)));
}
