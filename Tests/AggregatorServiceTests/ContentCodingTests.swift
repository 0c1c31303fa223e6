import Testing

@testable import AggregatorService

/// Response compression: a body compressed as it streams is byte for byte the one compressed
/// whole, so one ETag names one representation whichever way it was produced.
@Suite struct ContentCodingTests {
    /// Compressible but not trivial: float-like bytes with runs and noise, a few MB.
    static func sampleBody(seed: UInt64) -> [UInt8] {
        var state = seed &+ 0x9E37_79B9_7F4A_7C15
        return (0..<3_000_000).map { index in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return index % 4 == 3 ? UInt8(truncatingIfNeeded: index / 4096) : UInt8(truncatingIfNeeded: state >> 60)
        }
    }

    @Test(arguments: [ContentCoding.gzip, .zstd, .deflate], [1, 2, 3])
    func streamingInAnyPiecesGivesTheBytesOfCompressingWhole(coding: ContentCoding, seed: UInt64) throws {
        let body = Self.sampleBody(seed: seed)
        let whole = coding.compress(body)
        let encoder = try #require(ResponseEncoder(coding: coding))
        var streamed: [UInt8] = []
        var random = seed
        var offset = 0
        while offset < body.count {
            random = random &* 6_364_136_223_846_793_005 &+ 1
            // Pieces from 1 byte to 1 MiB, like an engine's tensors of very different sizes.
            let length = min(body.count - offset, 1 + Int(random >> 44))
            streamed += encoder.encode(Array(body[offset..<offset + length]))
            offset += length
        }
        streamed += encoder.finish()
        #expect(streamed == whole)
        #expect(whole.count < body.count)
        #expect(try ContentDecoding.inflate(whole, coding: coding.rawValue, limit: 1 << 30) == body)
    }
}
