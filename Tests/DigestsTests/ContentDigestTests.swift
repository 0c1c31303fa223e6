import Digests
import Testing

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
