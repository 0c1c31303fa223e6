import Foundation
import LoRAAdapters
import TestSupport
import Testing

@Suite struct DTypeTests {
    @Test(arguments: DType.allCases)
    func representableValuesRoundTrip(dtype: DType) {
        let values: [Double] = [0, -0.0, 1, -1, 0.5, 0.25, 3, -2.75, 100, 1.0 / 128, 96]
        let bytes = dtype.encode(values)
        #expect(bytes.count == values.count * dtype.byteWidth)
        #expect(dtype.decode(bytes) == values)
        #expect(dtype.encode(dtype.decode(bytes)) == bytes)
    }

    @Test func float32RoundsToNearestEvenFromFloat64() {
        let tie = 1 + 0x1p-24  // halfway between 1 and the next Float
        #expect(DType.f32.decode(DType.f32.encode([tie])) == [1])
        #expect(DType.f32.decode(DType.f32.encode([1 + 3 * 0x1p-24])) == [1 + 0x1p-22])
        #expect(DType.f32.decode(DType.f32.encode([1e39])) == [.infinity])
    }

    // (input, expected bfloat16 bits) — computed by hand from the format: 1 sign, 8 exponent, 7 fraction bits.
    @Test(
        arguments: [
            (1.0, 0x3F80), (-2.0, 0xC000), (0.0, 0x0000), (-0.0, 0x8000),
            (1 + 0x1p-8, 0x3F80),  // tie → even (down)
            (1 + 3 * 0x1p-8, 0x3F82),  // tie → even (up)
            (1 + 0x1p-8 + 0x1p-40, 0x3F81),  // just above a tie: rounding through Float first would give 0x3F80
            (1 + 0x1p-8 - 0x1p-40, 0x3F80),  // just below a tie
            (0x1p-133, 0x0001),  // smallest subnormal
            (0x1p-134, 0x0000),  // half the smallest subnormal: tie → even (zero)
            (1.5 * 0x1p-134, 0x0001),
            (0x1p-126, 0x0080),  // smallest normal
            (0x1.FEp127, 0x7F7F),  // largest finite
            (0x1.FFp127, 0x7F80),  // halfway to 2^128: tie → even, which is Inf
            (0x1.FEFFFFp127, 0x7F7F),  // just under that tie
            (1e39, 0x7F80), (-1e39, 0xFF80), (1e300, 0x7F80),
            (Double.infinity, 0x7F80), (-Double.infinity, 0xFF80),
        ] as [(Double, Int)])
    func bfloat16Rounding(input: Double, expected: Int) {
        #expect(BFloat16Rounding.bits(from: input) == UInt16(expected), "\(input)")
    }

    @Test func bfloat16KeepsNaNAsNaN() {
        for nan in [Double.nan, -Double.nan, Double.signalingNaN, Double(bitPattern: 0x7FF0_0000_0000_0001)] {
            let bits = BFloat16Rounding.bits(from: nan)
            #expect(bits & 0x7F80 == 0x7F80 && bits & 0x007F != 0, "NaN must not become Inf: \(String(bits, radix: 16))")
            #expect(BFloat16Rounding.float(fromBits: bits).isNaN)
        }
    }

    // (input, expected binary16 bits): 1 sign, 5 exponent, 10 fraction bits.
    @Test(
        arguments: [
            (1.0, 0x3C00), (-2.0, 0xC000), (-0.0, 0x8000),
            (1 + 0x1p-11, 0x3C00),  // tie → even
            (1 + 3 * 0x1p-11, 0x3C02),
            (1 + 0x1p-11 + 0x1p-40, 0x3C01),  // no double rounding
            (0x1p-24, 0x0001),  // smallest subnormal
            (0x1p-25, 0x0000),  // tie → even (zero)
            (1.5 * 0x1p-25, 0x0001),
            (65504, 0x7BFF),  // largest finite
            (65519.99, 0x7BFF),
            (65520, 0x7C00),  // tie → Inf
            (1e6, 0x7C00), (-1e6, 0xFC00),
        ] as [(Double, Int)])
    func float16Rounding(input: Double, expected: Int) {
        #expect(Float16Rounding.bits(from: input) == UInt16(expected), "\(input)")
    }

    @Test func float16KeepsNaNAsNaN() {
        let bits = Float16Rounding.bits(from: .nan)
        #expect(bits & 0x7C00 == 0x7C00 && bits & 0x03FF != 0)
    }

    @Test func decodingSubnormalsIsExact() {
        #expect(DType.f16.decode([0x01, 0x00]) == [0x1p-24])
        #expect(DType.bf16.decode([0x01, 0x00]) == [0x1p-133])
        #expect(DType.bf16.decode([0x80, 0x3F]) == [1])
    }

    @Test func outputEncodingMatchesTheScalarRounding() {
        var random = SeededGenerator(seed: 42)
        let values = (0..<10_000).map { _ in Double.random(in: -1...1, using: &random) * pow(2, Double(Int.random(in: -140...130, using: &random))) }
        let bf16 = DType.bf16.encode(values)
        let f16 = DType.f16.encode(values)
        for (index, value) in values.enumerated() {
            #expect(UInt16(bf16[2 * index]) | UInt16(bf16[2 * index + 1]) << 8 == BFloat16Rounding.bits(from: value))
            #expect(UInt16(f16[2 * index]) | UInt16(f16[2 * index + 1]) << 8 == Float16Rounding.bits(from: value))
        }
    }

    @Test func bfloat16RoundingAgreesWithExactRationalRounding() {
        // For random doubles, the chosen bfloat16 must be the nearest representable value (even on ties),
        // checked by comparing distances to both neighbours in Float64, where they are exact.
        var random = SeededGenerator(seed: 7)
        for _ in 0..<20_000 {
            let value = Double.random(in: 0.5...2, using: &random) * pow(2, Double(Int.random(in: -120...120, using: &random)))
            let bits = BFloat16Rounding.bits(from: value)
            let chosen = Double(BFloat16Rounding.float(fromBits: bits))
            let below = Double(BFloat16Rounding.float(fromBits: bits &- 1))
            let above = Double(BFloat16Rounding.float(fromBits: bits &+ 1))
            let distance = abs(chosen - value)
            #expect(distance <= abs(below - value) && distance <= abs(above - value), "\(value)")
            if distance == abs(below - value) || distance == abs(above - value) { #expect(bits & 1 == 0, "tie not to even: \(value)") }
        }
    }
}
