import Testing

@testable import Digests

@Suite struct ContentDigestTests {
    /// FIPS 180-2's examples.
    @Test(arguments: [
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
    ])
    func sha256OfKnownVectors(input: String, expected: String) {
        #expect(ContentDigest.sha256Hex(Array(input.utf8)) == expected)
    }

    @Test func crc32OfTheCheckStringAndInPieces() {
        let check = Array("123456789".utf8)
        #expect(check.withUnsafeBytes { ContentDigest.crc32($0) } == 0xCBF4_3926)
        let first = check[..<4].withUnsafeBytes { ContentDigest.crc32($0) }
        #expect(check[4...].withUnsafeBytes { ContentDigest.crc32($0, continuing: first) } == 0xCBF4_3926, "continuing gives the whole's CRC")
        #expect([UInt8]().withUnsafeBytes { ContentDigest.crc32($0) } == 0)
        #expect(ContentDigest.crc32(UnsafeRawBufferPointer(start: nil, count: 0), continuing: 0xCBF4_3926) == 0xCBF4_3926, "nothing added, nothing changed")
    }

    /// Both ways of computing it (carry-less multiplication for the bulk, where the CPU has it, and
    /// zlib's tables alone) against the CRC-32 bit by bit, as the polynomial defines it: every
    /// length around the 16- and 64-byte edges the fast path cuts at, at every alignment, continuing
    /// from an arbitrary CRC, and a megabyte.
    @Test(arguments: [false, ContentDigest.hasCarrylessMultiply])
    func crc32MatchesTheBitwiseDefinition(carrylessMultiply: Bool) {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<(1 << 20) + 16).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        bytes.withUnsafeBytes { all in
            for length in [0, 1, 15, 16, 17, 63, 64, 65, 79, 80, 127, 128, 129, 191, 192, 255, 256, 1000] {
                for offset in 0..<16 {
                    let seed = UInt32.random(in: .min ... .max, using: &generator)
                    let piece = UnsafeRawBufferPointer(rebasing: all[offset..<offset + length])
                    #expect(
                        ContentDigest.crc32(piece, continuing: seed, carrylessMultiply: carrylessMultiply) == Self.bitwiseCRC32(piece, continuing: seed),
                        "length \(length) at offset \(offset)")
                }
            }
            let megabyte = UnsafeRawBufferPointer(rebasing: all[3..<3 + (1 << 20)])
            #expect(ContentDigest.crc32(megabyte, continuing: 0, carrylessMultiply: carrylessMultiply) == Self.bitwiseCRC32(megabyte, continuing: 0))
        }
    }

    /// The one-pass SHA-256 and CRC-32 (cache-sized pieces, the last one short) against FIPS 180's
    /// SHA-256 as swift-crypto computes it whole and the bitwise CRC-32.
    @Test func sha256AndCRC32InOnePassAgreeWithEachComputedAlone() {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<(3 << 18) + 5).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let digests = ContentDigest.sha256HexAndCRC32(bytes)
        #expect(digests.sha256 == ContentDigest.sha256Hex(bytes))
        #expect(digests.crc32 == Self.bitwiseCRC32(bytes, continuing: 0))
    }

    /// The CRC-32 as its polynomial defines it, one bit at a time.
    private static func bitwiseCRC32(_ bytes: some Collection<UInt8>, continuing crc: UInt32) -> UInt32 {
        var register = ~crc
        for byte in bytes {
            register ^= UInt32(byte)
            for _ in 0..<8 { register = register & 1 == 1 ? (register >> 1) ^ 0xEDB8_8320 : register >> 1 }
        }
        return ~register
    }

    /// RFC 9530 §B.1 gives no SHA-256 of an empty body, so the reference is Python's
    /// `base64.b64encode(hashlib.sha256(b"").digest())`.
    @Test func reprDigestIsTheBase64OfTheDigestBetweenColons() {
        #expect(
            ContentDigest.reprDigest(sha256Hex: ContentDigest.sha256Hex([]))
                == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")
        #expect(ContentDigest.reprDigest(sha256Hex: "abc") == nil)
        #expect(ContentDigest.reprDigest(sha256Hex: String(repeating: "g", count: 64)) == nil)
    }

    @Test func hexIsLowercaseAndKeepsLeadingZeros() {
        #expect(ContentDigest.hex([0x00, 0x0F, 0xA0, 0xFF]) == "000fa0ff")
        #expect(ContentDigest.hex([]) == "")
    }
}
