#ifndef CKERNELS_H
#define CKERNELS_H
#include <stddef.h>
#include <stdint.h>

// The engine's hot loops with AVX2 (F16C, FMA), for the CPUs that have them. Each gives exactly the
// bits of the portable Swift loops in LoRAAdapters: accumulate and divide use no FMA (a fused
// multiply-add rounds once where the portable loop rounds twice) and conversions that are exact or
// round to nearest even; the Gram matrices use fused multiply-adds in the order stated, as the
// portable loops do.

/// True when the CPU runs the kernels below (AVX2, F16C and FMA).
int ckernels_cpu_supports_avx2(void);

/// destination[r*destination_stride + i] += weight * source[r*source_stride + i] for i < length and
/// r < rows (strides in elements); `source` holds little-endian elements of the dtype in the name, at
/// any alignment.
void ckernels_accumulate_f32(const void *source, size_t source_stride, double weight, double *destination, size_t destination_stride,
                             size_t length, size_t rows);
void ckernels_accumulate_f64(const void *source, size_t source_stride, double weight, double *destination, size_t destination_stride,
                             size_t length, size_t rows);
void ckernels_accumulate_f16(const void *source, size_t source_stride, double weight, double *destination, size_t destination_stride,
                             size_t length, size_t rows);
void ckernels_accumulate_bf16(const void *source, size_t source_stride, double weight, double *destination, size_t destination_stride,
                              size_t length, size_t rows);

/// destination[i] = round(sums[i] / divisor) to the dtype in the name, nearest even (bfloat16 as
/// the engine rounds it: to Float with round-to-odd, then to nearest even), at any alignment.
void ckernels_divide_f32(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_f64(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_f16(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_bf16(const double *sums, double divisor, void *destination, size_t count);

/// As divide, for `rows` consecutive rows of `length` elements, element j of each by divisors[j].
void ckernels_divide_rows_f32(const double *sums, const double *divisors, void *destination, size_t length, size_t rows);
void ckernels_divide_rows_f64(const double *sums, const double *divisors, void *destination, size_t length, size_t rows);
void ckernels_divide_rows_f16(const double *sums, const double *divisors, void *destination, size_t length, size_t rows);
void ckernels_divide_rows_bf16(const double *sums, const double *divisors, void *destination, size_t length, size_t rows);

/// Rows the Gram of columns takes per pass; its Float32 variant's scratch holds one pass of the
/// input as doubles: CKERNELS_GRAM_PASS * count of them.
#define CKERNELS_GRAM_PASS 512

/// The upper triangle of the Gram matrix of the `count` rows of `length` elements at x (row r at
/// x + r*stride; doubles, or floats taken as doubles): gram[i*count + j] for i <= j is x_i·x_j, as
/// four chains of fused multiply-adds (lane l takes the elements k = l mod 4, k ascending) summed as
/// (l0 + l1) + (l2 + l3). `lanes` is scratch of 4*count*count doubles; the entries below the
/// diagonal are unspecified. Floats give the bits of the same values as doubles.
void ckernels_gram_of_rows_f64(const double *x, size_t stride, size_t count, size_t length, double *lanes, double *gram);
void ckernels_gram_of_rows_f32(const float *x, size_t stride, size_t count, size_t length, double *lanes, double *gram);

/// The upper triangle of the Gram matrix of the `count` columns of the `rows` × count matrix at x
/// (row r at x + r*stride; doubles, or floats taken as doubles): gram[i*count + j] for i <= j is
/// Σ_r x[r][i]·x[r][j], one chain of fused multiply-adds in row order. The entries below the
/// diagonal are unspecified.
void ckernels_gram_of_columns_f64(const double *x, size_t stride, size_t count, size_t rows, double *gram);
void ckernels_gram_of_columns_f32(const float *x, size_t stride, size_t count, size_t rows, double *gram, double *scratch);

#endif
