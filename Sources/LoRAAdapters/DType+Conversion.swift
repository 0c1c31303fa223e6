/// Reading and writing single elements of each dtype from raw little-endian bytes.
///
/// Tensor data inside a safetensors file (or an SQLite blob) carries no alignment guarantee, so every
/// access is an unaligned load or store; on x86-64 and arm64 these compile to plain moves.
protocol ElementCodec {
    static var dtype: DType { get }
    static func load(_ base: UnsafeRawPointer, at index: Int) -> Double
    static func store(_ value: Double, to base: UnsafeMutableRawPointer, at index: Int)
    /// True when the element at `index` is NaN or ±Inf, decided on its bits.
    static func isNonFinite(_ base: UnsafeRawPointer, at index: Int) -> Bool
}

enum F32Codec: ElementCodec {
    static var dtype: DType { .f32 }
    @inline(__always) static func load(_ base: UnsafeRawPointer, at index: Int) -> Double {
        Double(Float(bitPattern: UInt32(littleEndian: base.loadUnaligned(fromByteOffset: index &* 4, as: UInt32.self))))
    }
    @inline(__always) static func store(_ value: Double, to base: UnsafeMutableRawPointer, at index: Int) {
        base.storeBytes(of: Float(value).bitPattern.littleEndian, toByteOffset: index &* 4, as: UInt32.self)
    }
    @inline(__always) static func isNonFinite(_ base: UnsafeRawPointer, at index: Int) -> Bool {
        UInt32(littleEndian: base.loadUnaligned(fromByteOffset: index &* 4, as: UInt32.self)) & 0x7F80_0000 == 0x7F80_0000
    }
}

enum F64Codec: ElementCodec {
    static var dtype: DType { .f64 }
    @inline(__always) static func load(_ base: UnsafeRawPointer, at index: Int) -> Double {
        Double(bitPattern: UInt64(littleEndian: base.loadUnaligned(fromByteOffset: index &* 8, as: UInt64.self)))
    }
    @inline(__always) static func store(_ value: Double, to base: UnsafeMutableRawPointer, at index: Int) {
        base.storeBytes(of: value.bitPattern.littleEndian, toByteOffset: index &* 8, as: UInt64.self)
    }
    @inline(__always) static func isNonFinite(_ base: UnsafeRawPointer, at index: Int) -> Bool {
        let bits = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: index &* 8, as: UInt64.self))
        return bits & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000
    }
}

enum F16Codec: ElementCodec {
    static var dtype: DType { .f16 }
    @inline(__always) static func load(_ base: UnsafeRawPointer, at index: Int) -> Double {
        Double(Float16(bitPattern: UInt16(littleEndian: base.loadUnaligned(fromByteOffset: index &* 2, as: UInt16.self))))
    }
    @inline(__always) static func store(_ value: Double, to base: UnsafeMutableRawPointer, at index: Int) {
        base.storeBytes(of: Float16Rounding.bits(from: value).littleEndian, toByteOffset: index &* 2, as: UInt16.self)
    }
    @inline(__always) static func isNonFinite(_ base: UnsafeRawPointer, at index: Int) -> Bool {
        UInt16(littleEndian: base.loadUnaligned(fromByteOffset: index &* 2, as: UInt16.self)) & 0x7C00 == 0x7C00
    }
}

enum BF16Codec: ElementCodec {
    static var dtype: DType { .bf16 }
    @inline(__always) static func load(_ base: UnsafeRawPointer, at index: Int) -> Double {
        let bits = UInt16(littleEndian: base.loadUnaligned(fromByteOffset: index &* 2, as: UInt16.self))
        return Double(Float(bitPattern: UInt32(bits) &<< 16))
    }
    @inline(__always) static func store(_ value: Double, to base: UnsafeMutableRawPointer, at index: Int) {
        base.storeBytes(of: BFloat16Rounding.bits(from: value).littleEndian, toByteOffset: index &* 2, as: UInt16.self)
    }
    @inline(__always) static func isNonFinite(_ base: UnsafeRawPointer, at index: Int) -> Bool {
        UInt16(littleEndian: base.loadUnaligned(fromByteOffset: index &* 2, as: UInt16.self)) & 0x7F80 == 0x7F80
    }
}

/// Double → IEEE binary16, round to nearest even, directly from Float64 (no double rounding).
public enum Float16Rounding {
    public static func bits(from value: Double) -> UInt16 {
        // Float16(Double) lowers to a single correctly rounded conversion (compiler-rt __truncdfhf2).
        Float16(value).bitPattern
    }
}

/// Double → bfloat16 by bit arithmetic, round to nearest even, NaN kept NaN (quiet, same sign).
public enum BFloat16Rounding {
    public static func bits(from value: Double) -> UInt16 {
        if value.isNaN { return bits(from: Float(value)) }
        // Rounding to Float with round-to-odd first keeps the final rounding to bfloat16 correct:
        // Float has 16 more significand bits than bfloat16, and round-to-odd never creates a false tie.
        return bits(from: floatRoundedToOdd(value))
    }

    public static func bits(from value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(truncatingIfNeeded: bits &>> 16) | 0x0040 }
        let roundingBias: UInt32 = 0x7FFF &+ ((bits &>> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ roundingBias) &>> 16)
    }

    public static func float(fromBits bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) &<< 16)
    }

    /// `value` truncated toward zero to Float, with the last significand bit set when inexact.
    static func floatRoundedToOdd(_ value: Double) -> Float {
        var result = Float(value)
        if Double(result) == value { return result }
        if abs(Double(result)) > abs(value) {
            result = result.sign == .minus ? result.nextUp : result.nextDown
        }
        return Float(bitPattern: result.bitPattern | 1)
    }
}

extension DType {
    /// Decodes element `index` of little-endian tensor data of this dtype.
    public func value(in bytes: UnsafeRawBufferPointer, at index: Int) -> Double {
        precondition(index >= 0 && (index + 1) * byteWidth <= bytes.count, "element index out of range")
        let base = bytes.baseAddress!
        switch self {
        case .f32: return F32Codec.load(base, at: index)
        case .f16: return F16Codec.load(base, at: index)
        case .bf16: return BF16Codec.load(base, at: index)
        case .f64: return F64Codec.load(base, at: index)
        }
    }

    /// Encodes `values` as little-endian bytes of this dtype, each rounded to nearest even.
    public func encode(_ values: [Double]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: values.count * byteWidth)
        bytes.withUnsafeMutableBytes { destination in
            values.withUnsafeBufferPointer { encode($0, into: destination.baseAddress!) }
        }
        return bytes
    }

    /// Decodes little-endian bytes of this dtype (`bytes.count` must be a multiple of the width).
    public func decode(_ bytes: [UInt8]) -> [Double] {
        precondition(bytes.count % byteWidth == 0, "byte count is not a multiple of the dtype width")
        return bytes.withUnsafeBytes { raw in (0..<(bytes.count / byteWidth)).map { value(in: raw, at: $0) } }
    }

    /// Decodes `count` elements at `source` to Float64 times `factor`, into `destination`.
    func decode(_ source: UnsafeRawPointer, count: Int, times factor: Double, into destination: UnsafeMutablePointer<Double>) {
        switch self {
        case .f32: Self.decode(source, count: count, times: factor, into: destination, as: F32Codec.self)
        case .f16: Self.decode(source, count: count, times: factor, into: destination, as: F16Codec.self)
        case .bf16: Self.decode(source, count: count, times: factor, into: destination, as: BF16Codec.self)
        case .f64: Self.decode(source, count: count, times: factor, into: destination, as: F64Codec.self)
        }
    }

    private static func decode<Codec: ElementCodec>(
        _ source: UnsafeRawPointer, count: Int, times factor: Double, into destination: UnsafeMutablePointer<Double>, as _: Codec.Type
    ) {
        var index = 0
        while index < count {
            destination[index] = factor * Codec.load(source, at: index)
            index &+= 1
        }
    }

    func encode(_ values: UnsafeBufferPointer<Double>, into destination: UnsafeMutableRawPointer) {
        switch self {
        case .f32: Self.encode(values, into: destination, as: F32Codec.self)
        case .f16: Self.encode(values, into: destination, as: F16Codec.self)
        case .bf16: Self.encode(values, into: destination, as: BF16Codec.self)
        case .f64: Self.encode(values, into: destination, as: F64Codec.self)
        }
    }

    private static func encode<Codec: ElementCodec>(
        _ values: UnsafeBufferPointer<Double>, into destination: UnsafeMutableRawPointer, as _: Codec.Type
    ) {
        for index in values.indices { Codec.store(values[index], to: destination, at: index) }
    }
}
