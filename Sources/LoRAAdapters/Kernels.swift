import CKernels

/// Which implementation runs the engine's hot loops (decode-multiply-accumulate, the fused
/// divide-and-round into the output, and hetlora's Gram matrices): the portable Swift loops, or
/// AVX2/F16C/FMA ones in C (CKernels) that give exactly the same bits. `best` is chosen once per
/// process by a CPU check.
public enum KernelSet: String, Sendable, CaseIterable {
    case portable
    case avx2

    public static let best: KernelSet = isSupported(.avx2) ? .avx2 : .portable

    public static func isSupported(_ kernels: KernelSet) -> Bool {
        switch kernels {
        case .portable: true
        case .avx2: ckernels_cpu_supports_avx2() != 0
        }
    }
}

/// One dtype's run loops, as the engine calls them.
protocol RunKernel {
    associatedtype Codec: ElementCodec
    /// `destination[r·destinationStride + i] += weight · source[r·sourceStride + i]` for `i < length`
    /// and `r < rows` (strides in elements): a B tensor's rows of its rank into rows of the output's.
    static func accumulate(
        _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>, stride destinationStride: Int,
        length: Int, rows: Int)
    /// `destination[i] = round(sums[i] / divisor)` for `i < count`.
    static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int)
    /// `destination[r·length + j] = round(sums[r·length + j] / divisors[j])` for `j < length`, `r < rows`.
    static func divide(_ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int)
}

extension RunKernel {
    static var dtype: DType { Codec.dtype }
}

/// The portable loops: every codec is its own kernel, written with wrapping index arithmetic and
/// plain pointers so that the compiler vectorises them for the baseline target (SSE2).
extension ElementCodec {
    typealias Codec = Self

    @inline(__always)
    static func accumulate(
        _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>, stride destinationStride: Int,
        length: Int, rows: Int
    ) {
        var row = 0
        while row < rows {
            let (sourceStart, destinationStart) = (row &* sourceStride, row &* destinationStride)
            var index = 0
            while index < length {
                destination[destinationStart &+ index] += weight * load(source, at: sourceStart &+ index)
                index &+= 1
            }
            row &+= 1
        }
    }

    @inline(__always)
    static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int) {
        var index = 0
        while index < count {
            store(sums[index] / divisor, to: destination, at: index)
            index &+= 1
        }
    }

    @inline(__always)
    static func divide(_ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int) {
        var index = 0
        var slice = 0
        while index < length &* rows {
            store(sums[index] / divisors[slice], to: destination, at: index)
            index &+= 1
            slice &+= 1
            if slice == length { slice = 0 }
        }
    }
}

extension F32Codec: RunKernel {
    enum Vectorised: RunKernel {
        typealias Codec = F32Codec
        static func accumulate(
            _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>,
            stride destinationStride: Int, length: Int, rows: Int
        ) {
            ckernels_accumulate_f32(source, sourceStride, weight, destination, destinationStride, length, rows)
        }
        static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int) {
            ckernels_divide_f32(sums, divisor, destination, count)
        }
        static func divide(
            _ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int
        ) {
            ckernels_divide_rows_f32(sums, divisors, destination, length, rows)
        }
    }
}

extension F64Codec: RunKernel {
    enum Vectorised: RunKernel {
        typealias Codec = F64Codec
        static func accumulate(
            _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>,
            stride destinationStride: Int, length: Int, rows: Int
        ) {
            ckernels_accumulate_f64(source, sourceStride, weight, destination, destinationStride, length, rows)
        }
        static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int) {
            ckernels_divide_f64(sums, divisor, destination, count)
        }
        static func divide(
            _ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int
        ) {
            ckernels_divide_rows_f64(sums, divisors, destination, length, rows)
        }
    }
}

extension F16Codec: RunKernel {
    enum Vectorised: RunKernel {
        typealias Codec = F16Codec
        static func accumulate(
            _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>,
            stride destinationStride: Int, length: Int, rows: Int
        ) {
            ckernels_accumulate_f16(source, sourceStride, weight, destination, destinationStride, length, rows)
        }
        static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int) {
            ckernels_divide_f16(sums, divisor, destination, count)
        }
        static func divide(
            _ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int
        ) {
            ckernels_divide_rows_f16(sums, divisors, destination, length, rows)
        }
    }
}

extension BF16Codec: RunKernel {
    enum Vectorised: RunKernel {
        typealias Codec = BF16Codec
        static func accumulate(
            _ source: UnsafeRawPointer, stride sourceStride: Int, weight: Double, into destination: UnsafeMutablePointer<Double>,
            stride destinationStride: Int, length: Int, rows: Int
        ) {
            ckernels_accumulate_bf16(source, sourceStride, weight, destination, destinationStride, length, rows)
        }
        static func divide(_ sums: UnsafePointer<Double>, by divisor: Double, into destination: UnsafeMutableRawPointer, count: Int) {
            ckernels_divide_bf16(sums, divisor, destination, count)
        }
        static func divide(
            _ sums: UnsafePointer<Double>, by divisors: UnsafePointer<Double>, into destination: UnsafeMutableRawPointer, length: Int, rows: Int
        ) {
            ckernels_divide_rows_bf16(sums, divisors, destination, length, rows)
        }
    }
}
