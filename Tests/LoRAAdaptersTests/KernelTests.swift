import Foundation
import TestSupport
import Testing

@testable import LoRAAdapters

/// The AVX2 kernels against the portable loops: the same bits for every dtype, on dtype edge cases
/// (ties, subnormals, overflow, infinities, NaN), on every length and alignment the tails see, and
/// through the whole engine on random rounds; and the Gram kernels of hetlora's norms. They run
/// where the CPU has AVX2, F16C and FMA (CI's does).
@Suite(.enabled(if: KernelSet.isSupported(.avx2))) struct KernelTests {
    /// Doubles that probe each rounding: exact halfway points between neighbours of Float, binary16
    /// and bfloat16 (ties to even both ways), one ulp either side of them, subnormals of each format,
    /// the overflow thresholds, ±0, ±∞ and NaNs with payloads; then random magnitudes.
    static func edgeCases(seed: UInt64) -> [Double] {
        var values: [Double] = [
            0, -0.0, .infinity, -.infinity, .nan, -Double.nan, Double(bitPattern: 0x7FF8_0000_DEAD_BEEF), Double(bitPattern: 0xFFF4_0000_0000_0001),
        ]
        for significandBits in [23, 10, 7] {  // Float, binary16, bfloat16
            for exponent in [-149, -126, -24, -15, -14, -1, 0, 1, 15, 16, 127, 128] {
                for mantissa in 0..<6 {
                    let neighbour = Double(sign: .plus, exponent: exponent, significand: 1 + Double(mantissa) / Double(1 << significandBits))
                    let halfway = neighbour + Double(sign: .plus, exponent: exponent - significandBits - 1, significand: 1)
                    for value in [halfway, halfway.nextUp, halfway.nextDown, neighbour, neighbour.nextUp] { values += [value, -value] }
                }
            }
        }
        values += [65504, 65519.99, 65520, 65520.01, 3.4028234663852886e38, 3.4028235677973366e38, 3.402823669e38, 1e300, .leastNonzeroMagnitude, 0x1p-1030]
        var random = SeededGenerator(seed: seed)
        for _ in 0..<2000 {
            let magnitude = Double(sign: .plus, exponent: Int(random.next() % 80) - 40, significand: 1 + Double(random.next() % (1 << 52)) / Double(1 << 52))
            values.append(random.next() % 2 == 0 ? magnitude : -magnitude)
        }
        return values
    }

    /// The portable and the AVX2 kernels of a dtype.
    static func kernels(of dtype: DType) -> (portable: any RunKernel.Type, vectorised: any RunKernel.Type) {
        switch dtype {
        case .f32: (F32Codec.self, F32Codec.Vectorised.self)
        case .f64: (F64Codec.self, F64Codec.Vectorised.self)
        case .f16: (F16Codec.self, F16Codec.Vectorised.self)
        case .bf16: (BF16Codec.self, BF16Codec.Vectorised.self)
        }
    }

    static func dividedBytes<Kernel: RunKernel>(_ values: [Double], by divisor: Double, misalignedBy offset: Int, with _: Kernel.Type) -> [UInt8] {
        var bytes = [UInt8](repeating: 0xAA, count: values.count * Kernel.dtype.byteWidth + offset)
        bytes.withUnsafeMutableBytes { destination in
            values.withUnsafeBufferPointer { Kernel.divide($0.baseAddress!, by: divisor, into: destination.baseAddress! + offset, count: values.count) }
        }
        return Array(bytes[offset...])
    }

    @Test(arguments: DType.allCases, [1.0, 3.0, 0.1, 7e-300, .infinity])
    func divideAndRoundGivesThePortableBits(dtype: DType, divisor: Double) {
        let values = Self.edgeCases(seed: 11)
        // Lengths around the vector widths reach every tail; offsets make every access unaligned.
        for count in [0, 1, 3, 4, 5, 7, 8, 9, 17, values.count] {
            for offset in [0, 1] {
                let slice = Array(values.prefix(count))
                let kernels = Self.kernels(of: dtype)
                let portable = Self.dividedBytes(slice, by: divisor, misalignedBy: offset, with: kernels.portable)
                let vectorised = Self.dividedBytes(slice, by: divisor, misalignedBy: offset, with: kernels.vectorised)
                #expect(
                    portable == vectorised,
                    "\(dtype) ÷ \(divisor), \(count) values at offset \(offset): first difference at byte \(portable.indices.first { portable[$0] != vectorised[$0] } ?? -1)"
                )
            }
        }
    }

    /// `rows` runs of `length` elements of `source` (runs `sourceStride` elements apart) added onto
    /// `start` (runs `destinationStride` elements apart); every bit of the sums.
    static func accumulated<Kernel: RunKernel>(
        _ source: [UInt8], weight: Double, onto start: [Double], misalignedBy offset: Int, rows: Int, length: Int, sourceStride: Int,
        destinationStride: Int, with _: Kernel.Type
    ) -> [UInt64] {
        var sums = start
        let padded = [UInt8](repeating: 0, count: offset) + source
        padded.withUnsafeBytes { bytes in
            sums.withUnsafeMutableBufferPointer {
                Kernel.accumulate(
                    bytes.baseAddress! + offset, stride: sourceStride, weight: weight, into: $0.baseAddress!, stride: destinationStride, length: length,
                    rows: rows)
            }
        }
        return sums.map(\.bitPattern)
    }

    /// Uploads are finite (validated on the way in), so the sources are every finite bit pattern's
    /// kind: random bits with non-finite ones replaced, subnormals and ±0 included.
    @Test(arguments: DType.allCases, [1.0, 0.375, 1e-7, 12345.678])
    func accumulateGivesThePortableBits(dtype: DType, weight: Double) {
        var random = SeededGenerator(seed: 5)
        let count = 1003
        let width = dtype.byteWidth
        var source = (0..<(count * width)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        source.withUnsafeMutableBytes { bytes in
            for index in 0..<count where !dtype.value(in: UnsafeRawBufferPointer(bytes), at: index).isFinite {
                bytes[index * width + width - 1] &= 0x80  // clear the exponent's top bits: finite
            }
        }
        let start = Self.edgeCases(seed: 3).prefix(count).map { $0.isFinite ? $0 : 1.5 }
        // Lengths around both vector widths (8 and 4) reach every tail; several rows with gaps
        // between them are a B tensor's rows going into the output's wider ones.
        typealias Shape = (length: Int, rows: Int, sourceStride: Int, destinationStride: Int)
        let shapes: [Shape] =
            [0, 1, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, count].map { ($0, 1, $0, $0) } + [(4, 3, 4, 9), (5, 7, 6, 20), (13, 4, 16, 64), (1, 9, 3, 2)]
        for shape in shapes {
            for offset in [0, 1] {
                let sourceCount = shape.rows == 0 ? 0 : (shape.rows - 1) * shape.sourceStride + shape.length
                let destinationCount = shape.rows == 0 ? 0 : (shape.rows - 1) * shape.destinationStride + shape.length
                let bytes = Array(source.prefix(sourceCount * width))
                let initial = Array(start.prefix(destinationCount))
                func run<Kernel: RunKernel>(_ kernel: Kernel.Type) -> [UInt64] {
                    Self.accumulated(
                        bytes, weight: weight, onto: initial, misalignedBy: offset, rows: shape.rows, length: shape.length, sourceStride: shape.sourceStride,
                        destinationStride: shape.destinationStride, with: kernel)
                }
                let kernels = Self.kernels(of: dtype)
                let (portable, vectorised) = (run(kernels.portable), run(kernels.vectorised))
                #expect(portable == vectorised, "\(dtype) × \(weight), \(shape) at offset \(offset)")
            }
        }
    }

    /// Rows divided element by element by a row of divisors (a B tensor's rank slices), with edge
    /// cases in both the sums and the divisors.
    @Test(arguments: DType.allCases)
    func divideRowsGivesThePortableBits(dtype: DType) {
        let values = Self.edgeCases(seed: 17)
        let divisorChoices: [Double] = [1, 3, 0.1, 7e-300, .infinity, 2.5e10, -0.0]
        for length in [1, 3, 4, 5, 8, 20, 64] {
            let divisors = (0..<length).map { divisorChoices[$0 % divisorChoices.count] }
            for rows in [1, 2, 7] {
                for offset in [0, 1] {
                    let sums = Array(values.prefix(length * rows))
                    func run<Kernel: RunKernel>(_: Kernel.Type) -> [UInt8] {
                        var bytes = [UInt8](repeating: 0xAA, count: sums.count * Kernel.dtype.byteWidth + offset)
                        bytes.withUnsafeMutableBytes { destination in
                            sums.withUnsafeBufferPointer { sums in
                                divisors.withUnsafeBufferPointer {
                                    Kernel.divide(sums.baseAddress!, by: $0.baseAddress!, into: destination.baseAddress! + offset, length: length, rows: rows)
                                }
                            }
                        }
                        return Array(bytes[offset...])
                    }
                    let kernels = Self.kernels(of: dtype)
                    let (portable, vectorised) = (run(kernels.portable), run(kernels.vectorised))
                    #expect(portable == vectorised, "\(dtype): \(rows) rows of \(length) at offset \(offset)")
                }
            }
        }
    }

    /// Counts around the Gram kernels' 2 × 4 and 4 × 8 tiles, and lengths around their four lanes
    /// and 512-element passes.
    static let gramCounts = [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17]
    static let gramLengths = [1, 3, 4, 5, 130, 512, 515, 1029]

    /// The upper triangle of a Gram matrix as bit patterns (the rest is unspecified).
    static func gram<Element: GramElement>(
        of values: [Element], count: Int, stride: Int, length: Int, ofRows: Bool, kernels: KernelSet
    ) -> [UInt64] {
        var gram = [Double](repeating: .nan, count: count * count)
        // Exactly the room the Gram of columns is promised.
        var scratch = [Double](repeating: .nan, count: count * min(length, Gram.passLength))
        values.withUnsafeBufferPointer { x in
            gram.withUnsafeMutableBufferPointer { gram in
                if ofRows {
                    Gram.ofRows(x.baseAddress!, stride: stride, count: count, length: length, into: gram.baseAddress!, kernels: kernels)
                } else {
                    scratch.withUnsafeMutableBufferPointer { scratch in
                        Gram.ofColumns(
                            x.baseAddress!, stride: stride, count: count, rows: length, into: gram.baseAddress!, scratch: scratch.baseAddress!,
                            kernels: kernels)
                    }
                }
            }
        }
        return (0..<count).flatMap { i in (i..<count).map { j in gram[i * count + j].bitPattern } }
    }

    /// Both Gram kernels give the portable loops' bits on random values, whatever the shape: a
    /// matrix's Gram matrix holds the same bits on every CPU. And Float32 input, read as it lies,
    /// gives the bits of the same values decoded to Float64.
    @Test(arguments: [true, false])
    func gramGivesThePortableBits(ofRows: Bool) {
        var random = SeededGenerator(seed: ofRows ? 41 : 42)
        for count in Self.gramCounts {
            for length in Self.gramLengths {
                // Rows wider than the data: the kernels must step by the stride and leave the gap alone.
                let stride = (ofRows ? length : count) + 3
                let values = (0..<((ofRows ? count : length) * stride)).map { _ in Double(Int64(bitPattern: random.next()) >> 11) * 0x1p-52 }
                let portable = Self.gram(of: values, count: count, stride: stride, length: length, ofRows: ofRows, kernels: .portable)
                let vectorised = Self.gram(of: values, count: count, stride: stride, length: length, ofRows: ofRows, kernels: .avx2)
                #expect(portable == vectorised, "\(ofRows ? "rows" : "columns"): \(count) of \(length)")
                let floats = values.map { Float($0) }
                let decoded = Self.gram(of: floats.map(Double.init), count: count, stride: stride, length: length, ofRows: ofRows, kernels: .portable)
                for kernels in KernelSet.allCases {
                    #expect(
                        Self.gram(of: floats, count: count, stride: stride, length: length, ofRows: ofRows, kernels: kernels) == decoded,
                        "\(kernels) \(ofRows ? "rows" : "columns") of Float32: \(count) of \(length)")
                }
            }
        }
    }

    /// Each entry is the right dot product: small integers make every sum exact in any order, so the
    /// entries equal the integer sums computed here.
    @Test(arguments: KernelSet.allCases, [true, false])
    func gramHoldsTheDotProducts(kernels: KernelSet, ofRows: Bool) {
        var random = SeededGenerator(seed: 43)
        for count in Self.gramCounts {
            for length in Self.gramLengths {
                let stride = (ofRows ? length : count) + 2
                let integers = (0..<((ofRows ? count : length) * stride)).map { _ in Int(random.next() % 201) - 100 }
                let element = { (vector: Int, k: Int) in ofRows ? integers[vector * stride + k] : integers[k * stride + vector] }
                let expected = (0..<count).flatMap { i in
                    (i..<count).map { j in Double((0..<length).reduce(0) { $0 + element(i, $1) * element(j, $1) }).bitPattern }
                }
                let gram = Self.gram(of: integers.map(Double.init), count: count, stride: stride, length: length, ofRows: ofRows, kernels: kernels)
                #expect(gram == expected, "\(kernels) \(ofRows ? "rows" : "columns"): \(count) of \(length)")
            }
        }
    }

    @Test(arguments: 0..<12, AggregationStrategy.allCases)
    func theEngineGivesTheSameBytesWithEitherKernelSet(seed: UInt64, strategy: AggregationStrategy) throws {
        let clients = seed < 6 ? TestRound.random(seed: 900 + seed) : TestRound.randomScaled(seed: 900 + seed)
        for dtype in DType.outputTypes {
            let portable = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: strategy, dtype: dtype, kernels: .portable))
            let vectorised = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: strategy, dtype: dtype, kernels: .avx2))
            #expect(portable.bytes == vectorised.bytes, "seed \(seed), \(strategy), \(dtype)")
        }
    }
}

/// Tensors large enough to be shared by two cores and summed block by block: against the literal
/// reference, with holders of every rank, a base giving the top slices, and a dense tensor.
@Suite struct LargeTensorTests {
    static func client(_ id: String, rank: Int, weight: Double, dtype: DType, seed: UInt64) -> TestClient {
        var random = SeededGenerator(seed: seed)
        func tensor(_ shape: [Int]) -> TestTensor {
            TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { _ in TestRound.randomValue(for: dtype, using: &random) })
        }
        // The literal reference's names, at sizes past the two-core threshold.
        let (a, b) = (TestModule.query.tensors(rank: rank)[0].0, TestModule.query.tensors(rank: rank)[1].0)
        return TestClient(
            id: id, rank: rank, weight: weight, dtype: dtype,
            tensors: [a: tensor([rank, 2051]), b: tensor([2053, rank]), TestModule.classifierBias.tensors(rank: 1)[0].0: tensor([131_101])])
    }

    @Test(arguments: [AggregationStrategy.replication, .zeroPadding], [DType.f32, .bf16])
    func largeTensorsMatchTheLiteralReference(strategy: AggregationStrategy, dtype: DType) throws {
        let clients = [
            Self.client("a", rank: 64, weight: 3, dtype: .f32, seed: 1), Self.client("b", rank: 8, weight: 1.5, dtype: .bf16, seed: 2),
            Self.client("c", rank: 33, weight: 7, dtype: .f16, seed: 3),
        ]
        let padding: LiteralReference.Padding = strategy == .replication ? .replication : .zeros
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: strategy, dtype: dtype))
        let reference = LiteralReference.aggregate(clients, padding: padding, rank: 64)
        try expectMatches(aggregate.bytes, reference, tolerance: dtype == .f32 ? 1e-6 : 8e-3, "\(strategy) \(dtype)")
        #expect(
            aggregate.bytes
                == (try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: strategy, dtype: dtype, kernels: .portable))).bytes)
    }
}
