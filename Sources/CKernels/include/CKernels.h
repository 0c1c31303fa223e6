#ifndef CKERNELS_H
#define CKERNELS_H
#include <stddef.h>
#include <stdint.h>

// The engine's two hot loops with AVX2 (and F16C), for the CPUs that have them. Each gives exactly
// the bits of the portable Swift loops in LoRAAdapters: no FMA (a fused multiply-add rounds once
// where the portable loop rounds twice), and conversions that are exact or round to nearest even.

/// True when the CPU runs the kernels below (AVX2 and F16C).
int ckernels_cpu_supports_avx2(void);

/// destination[i] += weight * source[i] for i < count; `source` holds little-endian elements of the
/// dtype in the name, at any alignment.
void ckernels_accumulate_f32(const void *source, double weight, double *destination, size_t count);
void ckernels_accumulate_f64(const void *source, double weight, double *destination, size_t count);
void ckernels_accumulate_f16(const void *source, double weight, double *destination, size_t count);
void ckernels_accumulate_bf16(const void *source, double weight, double *destination, size_t count);

/// destination[i] = round(sums[i] / divisor) to the dtype in the name, nearest even (bfloat16 as
/// the engine rounds it: to Float with round-to-odd, then to nearest even), at any alignment.
void ckernels_divide_f32(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_f64(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_f16(const double *sums, double divisor, void *destination, size_t count);
void ckernels_divide_bf16(const double *sums, double divisor, void *destination, size_t count);

#endif
