import CKernels

/// The upper triangles of Gram matrices, for hetlora's norms: fused multiply-adds in one stated
/// order, so the bits depend on the inputs alone, not on the CPU (unlike a BLAS, which picks its
/// kernels and their summation order per CPU family). The AVX2/FMA loops (CKernels) and the
/// portable ones here give the same bits.
enum Gram {
    /// `gram[i·count + j]` for `i ≤ j` is `x_i·x_j` of the `count` rows of `length` elements at `x`
    /// (row r at `x + r·stride`): four chains of fused multiply-adds, lane l taking the elements
    /// `k ≡ l (mod 4)` in ascending order, summed as `(l0 + l1) + (l2 + l3)`. Entries below the
    /// diagonal are unspecified.
    static func ofRows(
        _ x: UnsafePointer<Double>, stride: Int, count: Int, length: Int, into gram: UnsafeMutablePointer<Double>, kernels: KernelSet
    ) {
        switch kernels {
        case .avx2:
            withUnsafeTemporaryAllocation(of: Double.self, capacity: max(1, 4 * count * count)) { lanes in
                ckernels_gram_of_rows(x, stride, count, length, lanes.baseAddress!, gram)
            }
        case .portable:
            for i in 0..<count {
                for j in i..<count {
                    var lanes: (Double, Double, Double, Double) = (0, 0, 0, 0)
                    let (xi, xj) = (x + i * stride, x + j * stride)
                    var k = 0
                    while k + 4 <= length {
                        lanes.0.addProduct(xi[k], xj[k])
                        lanes.1.addProduct(xi[k + 1], xj[k + 1])
                        lanes.2.addProduct(xi[k + 2], xj[k + 2])
                        lanes.3.addProduct(xi[k + 3], xj[k + 3])
                        k += 4
                    }
                    if k < length { lanes.0.addProduct(xi[k], xj[k]) }
                    if k + 1 < length { lanes.1.addProduct(xi[k + 1], xj[k + 1]) }
                    if k + 2 < length { lanes.2.addProduct(xi[k + 2], xj[k + 2]) }
                    gram[i * count + j] = (lanes.0 + lanes.1) + (lanes.2 + lanes.3)
                }
            }
        }
    }

    /// `gram[i·count + j]` for `i ≤ j` is `Σ_r x[r][i]·x[r][j]` of the `count` columns of the
    /// `rows × count` matrix at `x` (row r at `x + r·stride`): one chain of fused multiply-adds in
    /// row order. Entries below the diagonal are unspecified.
    static func ofColumns(
        _ x: UnsafePointer<Double>, stride: Int, count: Int, rows: Int, into gram: UnsafeMutablePointer<Double>, kernels: KernelSet
    ) {
        switch kernels {
        case .avx2:
            ckernels_gram_of_columns(x, stride, count, rows, gram)
        case .portable:
            for i in 0..<count {
                for j in i..<count {
                    var sum = 0.0
                    for r in 0..<rows { sum.addProduct(x[r * stride + i], x[r * stride + j]) }
                    gram[i * count + j] = sum
                }
            }
        }
    }

    /// `‖B̃·Ã‖²_F = trace((B̃ᵀB̃)(ÃÃᵀ))` from the upper triangles of the two symmetric r × r Grams.
    static func traceOfProduct(_ first: UnsafePointer<Double>, _ second: UnsafePointer<Double>, count: Int) -> Double {
        var sum = 0.0
        for j in 0..<count {
            for i in 0...j { sum += (i == j ? 1 : 2) * first[i * count + j] * second[i * count + j] }
        }
        return sum
    }
}
