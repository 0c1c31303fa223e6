#ifndef CKERNELS_H
#define CKERNELS_H
#include <stddef.h>
#include <stdint.h>

// The engine's two hot loops with AVX2 (and F16C), for the CPUs that have them. Each gives exactly
// the bits of the portable Swift loops in LoRAAdapters: no FMA (a fused multiply-add rounds once
// where the portable loop rounds twice), and conversions that are exact or round to nearest even.

/// True when the CPU runs the kernels below (AVX2 and F16C).
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

#endif
