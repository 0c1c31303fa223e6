import CChecksums
import CZlib
import Crypto
import Foundation

/// SHA-256 in lowercase hex (an upload's `sha256`, a download's ETag, a token's stored hash) and
/// zlib's CRC-32. A module of its own so that whoever only needs to hash does not need the store.
public enum ContentDigest {
    public static func sha256Hex(_ bytes: [UInt8]) -> String { hex(SHA256.hash(data: bytes)) }

    /// The SHA-256 in hex and the CRC-32 of `bytes`, in one pass of cache-sized pieces.
    public static func sha256HexAndCRC32(_ bytes: [UInt8]) -> (sha256: String, crc32: UInt32) {
        var hasher = SHA256()
        var crc: UInt32 = 0
        bytes.withUnsafeBytes { all in
            for start in stride(from: 0, to: all.count, by: 1 << 18) {
                let piece = UnsafeRawBufferPointer(rebasing: all[start..<min(start + (1 << 18), all.count)])
                hasher.update(bufferPointer: piece)
                crc = crc32(piece, continuing: crc)
            }
        }
        return (hex(hasher.finalize()), crc)
    }

    /// zlib's CRC-32, continuing from `crc` (0 to start).
    public static func crc32(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        crc32(bytes, continuing: crc, carrylessMultiply: hasCarrylessMultiply)
    }

    /// Whether the CPU computes the CRC-32 by carry-less multiplication, about three times as fast
    /// as zlib's tables here (an aggregate's 134 MB: 12 ms against 38 ms).
    static let hasCarrylessMultiply = cchecksums_cpu_supports_pclmul() != 0

    /// The CRC-32 with or without carry-less multiplication (for its bulk: zlib does the last bytes).
    static func crc32(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32, carrylessMultiply: Bool) -> UInt32 {
        var crc = crc
        var rest = bytes
        if carrylessMultiply, bytes.count >= 64, let start = bytes.baseAddress {
            let bulk = bytes.count & ~15
            crc = cchecksums_crc32_pclmul(crc, start.assumingMemoryBound(to: UInt8.self), bulk)
            rest = UnsafeRawBufferPointer(rebasing: bytes[bulk...])
        }
        // zlib answers 0 for a null buffer, whatever the CRC so far; nothing left changes nothing.
        guard !rest.isEmpty, let remaining = rest.baseAddress else { return crc }
        return UInt32(truncatingIfNeeded: crc32_z(UInt(crc), remaining.assumingMemoryBound(to: UInt8.self), rest.count))
    }

    /// RFC 9530's `Repr-Digest` field value for a SHA-256 given in hex: `sha-256=:<base64>:`; nil if
    /// `hex` is not 64 hex digits.
    public static func reprDigest(sha256Hex hex: String) -> String? {
        let digits = Array(hex.utf8)
        guard digits.count == 64 else { return nil }
        var bytes: [UInt8] = []
        for index in stride(from: 0, to: 64, by: 2) {
            guard let byte = UInt8(String(decoding: digits[index..<index + 2], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(byte)
        }
        return "sha-256=:\(Data(bytes).base64EncodedString()):"
    }

    /// Bytes (a digest) in lowercase hex.
    public static func hex(_ bytes: some Sequence<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(2 * bytes.underestimatedCount)
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}
