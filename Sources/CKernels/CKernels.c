#include "CKernels.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

// The bits must not depend on compiler flags: no multiply and add fused unless written as fma.
#pragma clang fp contract(off)

#define AVX2 __attribute__((target("avx2,f16c")))

int ckernels_cpu_supports_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

// Scalar element access at any alignment (memcpy compiles to a plain move).
static inline float load_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }
static inline double load_f64(const unsigned char *p) { double v; memcpy(&v, p, 8); return v; }
static inline uint16_t load_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
AVX2 static inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }
static inline float bf16_to_float(uint16_t bits) { uint32_t v = (uint32_t)bits << 16; float f; memcpy(&f, &v, 4); return f; }

// Four doubles += weight * four doubles, as two roundings (multiply, then add).
AVX2 static inline void add4(double *destination, __m256d weight, __m256d values) {
    _mm256_storeu_pd(destination, _mm256_add_pd(_mm256_loadu_pd(destination), _mm256_mul_pd(weight, values)));
}

// One run of each dtype: destination[i] += weight * source[i] for i < count, eight elements at a
// time, then four, then one by one.
AVX2 static inline void accumulate_run_f32(const unsigned char *s, __m256d w, double weight, double *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 x = _mm256_loadu_ps((const float *)(s + 4 * i));
        add4(destination + i, w, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        add4(destination + i + 4, w, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
    for (; i + 4 <= count; i += 4) add4(destination + i, w, _mm256_cvtps_pd(_mm_loadu_ps((const float *)(s + 4 * i))));
    for (; i < count; i++) destination[i] += weight * (double)load_f32(s + 4 * i);
}

AVX2 static inline void accumulate_run_f64(const unsigned char *s, __m256d w, double weight, double *destination, size_t count) {
    size_t i = 0;
    for (; i + 4 <= count; i += 4) add4(destination + i, w, _mm256_loadu_pd((const double *)(s + 8 * i)));
    for (; i < count; i++) destination[i] += weight * load_f64(s + 8 * i);
}

AVX2 static inline void accumulate_run_f16(const unsigned char *s, __m256d w, double weight, double *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 2 * i)));
        add4(destination + i, w, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        add4(destination + i + 4, w, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
    for (; i + 4 <= count; i += 4) add4(destination + i, w, _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s + 2 * i)))));
    for (; i < count; i++) destination[i] += weight * (double)half_to_float(load_u16(s + 2 * i));
}

AVX2 static inline void accumulate_run_bf16(const unsigned char *s, __m256d w, double weight, double *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256i widened = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + 2 * i))), 16);
        __m256 x = _mm256_castsi256_ps(widened);
        add4(destination + i, w, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        add4(destination + i + 4, w, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
    for (; i + 4 <= count; i += 4) {
        __m128i widened = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(s + 2 * i))), 16);
        add4(destination + i, w, _mm256_cvtps_pd(_mm_castsi128_ps(widened)));
    }
    for (; i < count; i++) destination[i] += weight * (double)bf16_to_float(load_u16(s + 2 * i));
}

// The exported kernels run `rows` runs of `length` elements, `source_stride` and
// `destination_stride` elements apart: a B tensor's rows of r elements into rows of the output's
// rank in one call.
#define ACCUMULATE_ROWS(name, width)                                                                          \
    AVX2 void ckernels_accumulate_##name(const void *source, size_t source_stride, double weight,            \
                                         double *destination, size_t destination_stride, size_t length,      \
                                         size_t rows) {                                                      \
        __m256d w = _mm256_set1_pd(weight);                                                                  \
        for (size_t row = 0; row < rows; row++)                                                              \
            accumulate_run_##name((const unsigned char *)source + (width) * source_stride * row, w, weight,  \
                                  destination + destination_stride * row, length);                           \
    }
ACCUMULATE_ROWS(f32, 4)
ACCUMULATE_ROWS(f64, 8)
ACCUMULATE_ROWS(f16, 2)
ACCUMULATE_ROWS(bf16, 2)

// Four 64-bit lane masks as four 32-bit ones.
AVX2 static inline __m128i pack_mask(__m256d mask) {
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(mask), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
}

// Four doubles to Float with round-to-odd: nearest first, then one step toward zero where that
// overshot in magnitude, and the last bit set where inexact. Float has 13 more significand bits
// than binary16 and 16 more than bfloat16, so rounding this once more to nearest even is exactly
// rounding the doubles once (round-to-odd never makes a false tie). NaN lanes come out as nearest
// gives them (quiet, top payload bits).
AVX2 static inline __m128i round_to_odd(__m256d values) {
    __m128 nearest = _mm256_cvtpd_ps(values);
    __m256d back = _mm256_cvtps_pd(nearest);
    __m256d magnitude = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFF));
    __m256d overshot = _mm256_cmp_pd(_mm256_and_pd(back, magnitude), _mm256_and_pd(values, magnitude), _CMP_GT_OQ);
    __m256d inexact = _mm256_cmp_pd(back, values, _CMP_NEQ_OQ);  // false for NaN lanes
    __m128i overshotMask = pack_mask(overshot);
    __m128i inexactMask = pack_mask(inexact);
    __m128i bits = _mm_castps_si128(nearest);
    bits = _mm_add_epi32(bits, overshotMask);  // a mask lane is -1: one step toward zero in magnitude
    return _mm_or_si128(bits, _mm_and_si128(inexactMask, _mm_set1_epi32(1)));
}

// bfloat16 from Float bits, nearest even; NaN kept quiet with its sign and top payload bits.
AVX2 static inline __m128i float_bits_to_bf16(__m128i bits) {
    __m128i exponentAll = _mm_set1_epi32(0x7F800000);
    __m128i isNaN = _mm_and_si128(_mm_cmpeq_epi32(_mm_and_si128(bits, exponentAll), exponentAll),
                                  _mm_xor_si128(_mm_cmpeq_epi32(_mm_and_si128(bits, _mm_set1_epi32(0x007FFFFF)), _mm_setzero_si128()), _mm_set1_epi32(-1)));
    __m128i bias = _mm_add_epi32(_mm_set1_epi32(0x7FFF), _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1)));
    __m128i rounded = _mm_srli_epi32(_mm_add_epi32(bits, bias), 16);
    __m128i nan = _mm_or_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(0x0040));
    return _mm_blendv_epi8(rounded, nan, isNaN);
}

// Four quotients, and one, stored as each dtype at d (any alignment).
AVX2 static inline void store4_f64(unsigned char *d, __m256d q) { _mm256_storeu_pd((double *)d, q); }
AVX2 static inline void store1_f64(unsigned char *d, double q) { memcpy(d, &q, 8); }
AVX2 static inline void store4_f32(unsigned char *d, __m256d q) { _mm_storeu_ps((float *)d, _mm256_cvtpd_ps(q)); }
AVX2 static inline void store1_f32(unsigned char *d, double q) {
    float f = (float)q;
    memcpy(d, &f, 4);
}
AVX2 static inline void store4_f16(unsigned char *d, __m256d q) {
    _mm_storel_epi64((__m128i *)d, _mm_cvtps_ph(_mm_castsi128_ps(round_to_odd(q)), _MM_FROUND_TO_NEAREST_INT));
}
AVX2 static inline void store1_f16(unsigned char *d, double q) {
    __m128i odd = round_to_odd(_mm256_setr_pd(q, 0, 0, 0));
    uint16_t h = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_castsi128_ps(odd), _MM_FROUND_TO_NEAREST_INT), 0);
    memcpy(d, &h, 2);
}
AVX2 static inline void store4_bf16(unsigned char *d, __m256d q) {
    __m128i halves = float_bits_to_bf16(round_to_odd(q));
    // The low 16 bits of each 32-bit lane, packed (all lanes fit in 16 bits unsigned).
    _mm_storel_epi64((__m128i *)d, _mm_packus_epi32(halves, halves));
}
AVX2 static inline void store1_bf16(unsigned char *d, double q) {
    uint16_t h = (uint16_t)_mm_extract_epi32(float_bits_to_bf16(round_to_odd(_mm256_setr_pd(q, 0, 0, 0))), 0);
    memcpy(d, &h, 2);
}

// divide: every element by one divisor. divide_rows: `rows` rows of `length` elements, element j of
// each row by divisors[j] (a B tensor's rank slices).
#define DIVIDE(name, width)                                                                                       \
    AVX2 void ckernels_divide_##name(const double *sums, double divisor, void *destination, size_t count) {     \
        unsigned char *d = destination;                                                                         \
        __m256d v = _mm256_set1_pd(divisor);                                                                    \
        size_t i = 0;                                                                                           \
        for (; i + 4 <= count; i += 4) store4_##name(d + (width) * i, _mm256_div_pd(_mm256_loadu_pd(sums + i), v)); \
        for (; i < count; i++) store1_##name(d + (width) * i, sums[i] / divisor);                               \
    }                                                                                                           \
    AVX2 void ckernels_divide_rows_##name(const double *sums, const double *divisors, void *destination,        \
                                          size_t length, size_t rows) {                                         \
        unsigned char *d = destination;                                                                         \
        for (size_t row = 0; row < rows; row++, sums += length, d += (width) * length) {                        \
            size_t j = 0;                                                                                       \
            for (; j + 4 <= length; j += 4)                                                                     \
                store4_##name(d + (width) * j,                                                                  \
                              _mm256_div_pd(_mm256_loadu_pd(sums + j), _mm256_loadu_pd(divisors + j)));         \
            for (; j < length; j++) store1_##name(d + (width) * j, sums[j] / divisors[j]);                      \
        }                                                                                                       \
    }
DIVIDE(f64, 8)
DIVIDE(f32, 4)
DIVIDE(f16, 2)
DIVIDE(bf16, 2)

// Gram matrices of hetlora's norms: chains of fused multiply-adds (one rounding each) in the order
// the header states, which the portable Swift loops (LoRAAdapters' Gram) follow too. Float32 input
// gives the bits of the same values as doubles (the conversion is exact).
#define AVX2_FMA __attribute__((target("avx2,fma")))

// Elements summed over per pass: a pass's slices of the operands stay in L2 while every tile of
// the matrix reads them; the partial sums are carried from pass to pass in memory.
enum { GRAM_PASS = CKERNELS_GRAM_PASS };

static inline size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

// `count` runs of `length` floats, `stride` apart, as doubles back to back in `scratch`.
AVX2_FMA static void widen_runs(const float *x, size_t stride, size_t count, size_t length, double *scratch) {
    for (size_t i = 0; i < count; i++, x += stride, scratch += length) {
        size_t k = 0;
        for (; k + 4 <= length; k += 4) _mm256_storeu_pd(scratch + k, _mm256_cvtps_pd(_mm_loadu_ps(x + k)));
        for (; k < length; k++) scratch[k] = (double)x[k];
    }
}

// Four elements, and one, of each input type as doubles.
AVX2_FMA static inline __m256d load4_f64(const double *p) { return _mm256_loadu_pd(p); }
AVX2_FMA static inline __m256d load4_f32(const float *p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

// Lanes of pairs (i..i+I-1) × (j..j+J-1) over quads [q0, q1): I·J vectors of chains in registers
// (the constant loops unroll).
#define ROWS_TILE(T, E, I, J)                                                                                                     \
    AVX2_FMA static inline void rows_tile_##T##_##I##x##J(const E *x, size_t stride, size_t count, size_t i, size_t j, size_t q0, \
                                                           size_t q1, double *lanes) {                                            \
        __m256d s[I][J];                                                                                                          \
        for (int a = 0; a < I; a++)                                                                                               \
            for (int b = 0; b < J; b++) s[a][b] = _mm256_loadu_pd(lanes + 4 * ((i + a) * count + j + b));                       \
        for (size_t q = q0; q < q1; q++) {                                                                                        \
            __m256d u[I];                                                                                                         \
            for (int a = 0; a < I; a++) u[a] = load4_##T(x + (i + a) * stride + 4 * q);                                          \
            for (int b = 0; b < J; b++) {                                                                                         \
                __m256d v = load4_##T(x + (j + b) * stride + 4 * q);                                                              \
                for (int a = 0; a < I; a++) s[a][b] = _mm256_fmadd_pd(u[a], v, s[a][b]);                                         \
            }                                                                                                                     \
        }                                                                                                                         \
        for (int a = 0; a < I; a++)                                                                                               \
            for (int b = 0; b < J; b++) _mm256_storeu_pd(lanes + 4 * ((i + a) * count + j + b), s[a][b]);                       \
    }

// Rows j are taken in blocks of four, each with every row i up to the block's last (2 × 4 tiles: a
// few pairs below the diagonal too, for full tiles), then one at a time; the last length mod 4
// elements are added to their lanes at the end. Float32 is converted in the tiles, not widened a
// pass at a time: the rows of a pass are runs far apart, which the tiles' interleaved reads fetch
// from memory better than one sweep.
#define GRAM_OF_ROWS(T, E)                                                                                                        \
    ROWS_TILE(T, E, 2, 4)                                                                                                         \
    ROWS_TILE(T, E, 1, 1)                                                                                                         \
    AVX2_FMA void ckernels_gram_of_rows_##T(const E *x, size_t stride, size_t count, size_t length, double *lanes, double *gram) { \
        memset(lanes, 0, 4 * count * count * sizeof(double));                                                                     \
        size_t quads = length / 4, blocked = count & ~(size_t)3;                                                                  \
        for (size_t q0 = 0; q0 < quads; q0 += GRAM_PASS / 4) {                                                                    \
            size_t q1 = min_size(quads, q0 + GRAM_PASS / 4);                                                                      \
            for (size_t j = 0; j < blocked; j += 4) {                                                                             \
                for (size_t i = 0; i < j + 4; i += 2) rows_tile_##T##_2x4(x, stride, count, i, j, q0, q1, lanes);                 \
            }                                                                                                                     \
            for (size_t j = blocked; j < count; j++) {                                                                            \
                for (size_t i = 0; i <= j; i++) rows_tile_##T##_1x1(x, stride, count, i, j, q0, q1, lanes);                       \
            }                                                                                                                     \
        }                                                                                                                         \
        for (size_t i = 0; i < count; i++) {                                                                                      \
            for (size_t j = i; j < count; j++) {                                                                                  \
                double *l = lanes + 4 * (i * count + j);                                                                          \
                for (size_t k = 4 * quads; k < length; k++)                                                                       \
                    l[k % 4] = fma((double)x[i * stride + k], (double)x[j * stride + k], l[k % 4]);                               \
                gram[i * count + j] = (l[0] + l[1]) + (l[2] + l[3]);                                                              \
            }                                                                                                                     \
        }                                                                                                                         \
    }
GRAM_OF_ROWS(f64, double)
GRAM_OF_ROWS(f32, float)

// Pairs (i..i+ROWS-1) × (j..j+4·VECTORS-1) over rows [r0, r1): ROWS·VECTORS vectors of chains in
// registers.
#define COLUMNS_TILE(ROWS, VECTORS)                                                                                          \
    AVX2_FMA static inline void columns_tile_##ROWS##x##VECTORS(const double *x, size_t stride, size_t count, size_t i,       \
                                                               size_t j, size_t r0, size_t r1, double *gram) {              \
        __m256d s[ROWS][VECTORS];                                                                                            \
        for (int a = 0; a < ROWS; a++)                                                                                       \
            for (int v = 0; v < VECTORS; v++) s[a][v] = _mm256_loadu_pd(gram + (i + a) * count + j + 4 * v);                 \
        for (size_t r = r0; r < r1; r++) {                                                                                   \
            const double *row = x + r * stride;                                                                              \
            for (int v = 0; v < VECTORS; v++) {                                                                              \
                __m256d column = _mm256_loadu_pd(row + j + 4 * v);                                                          \
                for (int a = 0; a < ROWS; a++) s[a][v] = _mm256_fmadd_pd(_mm256_broadcast_sd(row + i + a), column, s[a][v]); \
            }                                                                                                                \
        }                                                                                                                    \
        for (int a = 0; a < ROWS; a++)                                                                                       \
            for (int v = 0; v < VECTORS; v++) _mm256_storeu_pd(gram + (i + a) * count + j + 4 * v, s[a][v]);                \
    }
COLUMNS_TILE(4, 2)
COLUMNS_TILE(4, 1)

// One pass, rows [r0, r1), into the Gram: columns j in blocks of eight (4 × 8 tiles), then of four
// (4 × 4), each with every row up to the block's last, then one at a time. Float32 rows are widened
// a pass at a time into the caller's scratch first (a pass is one contiguous run): each element is
// converted once, not once per tile, and the tiles broadcast straight from memory.
AVX2_FMA static void columns_pass(const double *x, size_t stride, size_t count, size_t r0, size_t r1, double *gram) {
    size_t blocked = count & ~(size_t)7, vectored = count & ~(size_t)3;
    for (size_t j = 0; j < blocked; j += 8) {
        for (size_t i = 0; i < j + 8; i += 4) columns_tile_4x2(x, stride, count, i, j, r0, r1, gram);
    }
    for (size_t j = blocked; j < vectored; j += 4) {
        for (size_t i = 0; i < j + 4; i += 4) columns_tile_4x1(x, stride, count, i, j, r0, r1, gram);
    }
    for (size_t j = vectored; j < count; j++) {
        for (size_t i = 0; i <= j; i++) {
            double s = gram[i * count + j];
            for (size_t r = r0; r < r1; r++) s = fma(x[r * stride + i], x[r * stride + j], s);
            gram[i * count + j] = s;
        }
    }
}

AVX2_FMA void ckernels_gram_of_columns_f64(const double *x, size_t stride, size_t count, size_t rows, double *gram) {
    memset(gram, 0, count * count * sizeof(double));
    for (size_t r0 = 0; r0 < rows; r0 += GRAM_PASS) columns_pass(x, stride, count, r0, min_size(rows, r0 + GRAM_PASS), gram);
}

AVX2_FMA void ckernels_gram_of_columns_f32(const float *x, size_t stride, size_t count, size_t rows, double *gram, double *scratch) {
    memset(gram, 0, count * count * sizeof(double));
    for (size_t r0 = 0; r0 < rows; r0 += GRAM_PASS) {
        size_t r1 = min_size(rows, r0 + GRAM_PASS);
        widen_runs(x + r0 * stride, stride, r1 - r0, count, scratch);
        columns_pass(scratch, count, count, 0, r1 - r0, gram);
    }
}
