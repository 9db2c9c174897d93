/* Blockwise 4-bit dequantization in one pass per packed byte (lorakit.quant.ckernel builds and loads it).

   out[i] = table[code_i] * absmax[i / bs]   (one IEEE fp32 multiply, then one rounding to bf16/fp16)

   Byte layout as bitsandbytes' quantize_4bit: element 2k is the high nibble of byte k, 2k+1 the low one.
   The product is the same single fp32 multiply as the numpy/torch path (built with -ffp-contract=off and
   no -ffast-math), so every result is bit-identical to it and to bitsandbytes. The 16-bit casts round
   to nearest even like torch's: bf16 keeps the top half after adding 0x7FFF + lsb (NaN -> 0x7FC0, as
   c10::BFloat16); fp16 is x86's vcvtps2ph (IEEE binary16: subnormals, overflow to inf, as torch's
   vectorized cast).

   Two implementations, chosen per call: portable C (a 256-entry table of byte pairs; fp32 output
   only), and on x86-64 with AVX2 + F16C (checked at run time) 16 weights per step: nibbles -> two
   8-entry permutes -> multiply -> store (fp32, or cast to bf16/fp16 in registers). Both do the same
   arithmetic; only the lookup differs. */

#include <stddef.h>
#include <stdint.h>

#define LK_ABI 1

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

int lk_abi(void) { return LK_ABI; }

/* -- portable (fp32 output only: its 16-bit casts were slower than torch's vectorized cast) ------------ */
/* pairs: (256, 2) fp32, the two values of a byte (high nibble first). Blocks [b0, b1) of bs elements;
   packed and out point at the first one. */
static void span_c(const uint8_t *packed, const float *absmax, const float *pairs, int64_t bs,
                   int64_t b0, int64_t b1, float *out) {
    const int64_t half = bs / 2;
    for (int64_t b = b0; b < b1; ++b) {
        const float a = absmax[b];
        const uint8_t *p = packed + (b - b0) * half;
        float *dst = out + (b - b0) * bs;
        for (int64_t j = 0; j < half; ++j) {
            const float *v = pairs + 2 * p[j];
            dst[2 * j] = v[0] * a;
            dst[2 * j + 1] = v[1] * a;
        }
    }
}

/* -- x86-64: AVX2 + F16C ----------------------------------------------------------------------------- */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LK_SIMD 1

#define AVX2 __attribute__((target("avx2,f16c")))

/* 8 codes (int32, 0..15) -> their 8 table values: entries 0-7 from lo8, 8-15 from hi8, chosen by bit 3 */
AVX2 static inline __m256 lookup16(__m256i idx, __m256 lo8, __m256 hi8) {
    __m256 a = _mm256_permutevar8x32_ps(lo8, idx), b = _mm256_permutevar8x32_ps(hi8, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

AVX2 static inline __m128i bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    return _mm_packus_epi32(lo, hi); /* every value <= 0xFFFF: no saturation */
}

AVX2 static void span_avx2(const uint8_t *packed, const float *absmax, const float *table, int64_t bs,
                           int64_t b0, int64_t b1, void *out, int kind) {
    const __m256 lo8 = _mm256_loadu_ps(table), hi8 = _mm256_loadu_ps(table + 8);
    const __m128i mask = _mm_set1_epi8(15);
    const int64_t half = bs / 2; /* bs >= 32: whole steps of 8 bytes */
    for (int64_t b = b0; b < b1; ++b) {
        const __m256 a = _mm256_set1_ps(absmax[b]);
        const uint8_t *p = packed + (b - b0) * half;
        const int64_t o = (b - b0) * bs;
        for (int64_t j = 0; j < half; j += 8) {
            __m128i x = _mm_loadl_epi64((const __m128i *)(p + j)); /* 8 bytes = 16 codes */
            __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), mask), lo = _mm_and_si128(x, mask);
            __m128i nib = _mm_unpacklo_epi8(hi, lo); /* h0 l0 h1 l1 ... h7 l7: element order */
            __m256 v0 = _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(nib), lo8, hi8), a);
            __m256 v1 = _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)), lo8, hi8), a);
            if (kind == OUT_F32) {
                float *dst = (float *)out + o + 2 * j;
                _mm256_storeu_ps(dst, v0);
                _mm256_storeu_ps(dst + 8, v1);
            } else if (kind == OUT_BF16) {
                uint16_t *dst = (uint16_t *)out + o + 2 * j;
                _mm_storeu_si128((__m128i *)dst, bf16x8(v0));
                _mm_storeu_si128((__m128i *)(dst + 8), bf16x8(v1));
            } else {
                uint16_t *dst = (uint16_t *)out + o + 2 * j;
                _mm_storeu_si128((__m128i *)dst, _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                _mm_storeu_si128((__m128i *)(dst + 8), _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
    }
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif

/* 1 if the SIMD path would run on this CPU. */
int lk_simd_available(void) {
#ifdef LK_SIMD
    return have_avx2();
#else
    return 0;
#endif
}

/* Whole blocks [b0, b1): packed -> the bytes of block b0, out -> its first element (fp32 or 16-bit).
   table: (16,) fp32 by code; pairs: (256, 2) fp32 by byte. simd=0 forces the portable loop.
   Returns 1 when done, 0 when this output kind needs the SIMD path and it is not available. */
int lk_dequant4(const uint8_t *packed, const float *absmax, const float *table, const float *pairs,
                int64_t bs, int64_t b0, int64_t b1, void *out, int kind, int simd) {
#ifdef LK_SIMD
    if (simd && bs % 16 == 0 && have_avx2()) {
        span_avx2(packed, absmax, table, bs, b0, b1, out, kind);
        return 1;
    }
#endif
    (void)table;
    (void)simd;
    if (kind != OUT_F32) return 0;
    span_c(packed, absmax, pairs, bs, b0, b1, (float *)out);
    return 1;
}

/* 8-bit blockwise codes (double-quantized absmax, Adam8bit states): out[i] = map[codes[i]] * absmax[i / bs],
   n elements, the last block possibly short. */
void lk_dequant8(const uint8_t *codes, const float *absmax, const float *map, int64_t bs, int64_t n, float *out) {
    for (int64_t s = 0; s < n; s += bs) {
        const float a = absmax[s / bs];
        const int64_t e = s + bs < n ? s + bs : n;
        for (int64_t i = s; i < e; ++i) out[i] = map[codes[i]] * a;
    }
}
