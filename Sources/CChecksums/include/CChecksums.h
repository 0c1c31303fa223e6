#ifndef CCHECKSUMS_H
#define CCHECKSUMS_H
#include <stddef.h>
#include <stdint.h>

/// True when the CPU has carry-less multiplication (PCLMULQDQ) and SSE4.1.
int cchecksums_cpu_supports_pclmul(void);

/// Continues zlib's CRC-32 (reflected, polynomial 0xEDB88320, pre- and post-inverted) `crc` over
/// `count` bytes, a multiple of 16 and at least 64, with carry-less multiplication: call only when
/// `cchecksums_cpu_supports_pclmul` said so. Gives exactly zlib's `crc32_z`, about ten times as fast.
uint32_t cchecksums_crc32_pclmul(uint32_t crc, const unsigned char *bytes, size_t count);

#endif
