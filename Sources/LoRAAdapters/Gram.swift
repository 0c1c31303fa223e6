import CKernels

/// The upper triangles of Gram matrices, for hetlora's norms: fused multiply-adds in one stated
/// order, so the bits depend on the inputs alone, not on the CPU (unlike a BLAS, which picks its
/// kernels and their summation order per CPU family). The AVX2/FMA loops (CKernels) and the
/// portable ones here give the same bits.
enum Gram {
    /// Rows the vectorised Gram of columns takes per pass.
    static let passLength = Int(CKERNELS_GRAM_PASS)

    /// `gram[i·count + j]` for `i ≤ j` is `x_i·x_j` of the `count` rows of `length` elements at `x`
    /// (row r at `x + r·stride`; Float32 gives the bits of the same values in Float64): four chains
    /// of fused multiply-adds, lane l taking the elements `k ≡ l (mod 4)` in ascending order, summed
    /// as `(l0 + l1) + (l2 + l3)`. Entries below the diagonal are unspecified.
    static func ofRows<Element: GramElement>(
        _ x: UnsafePointer<Element>, stride: Int, count: Int, length: Int, into gram: UnsafeMutablePointer<Double>, kernels: KernelSet
    ) {
        switch kernels {
        case .avx2:
            withUnsafeTemporaryAllocation(of: Double.self, capacity: max(1, 4 * count * count)) { lanes in
                Element.vectorisedGramOfRows(x, stride, count, length, lanes.baseAddress!, gram)
            }
        case .portable:
            for i in 0..<count {
                for j in i..<count {
                    var lanes: (Double, Double, Double, Double) = (0, 0, 0, 0)
                    let (xi, xj) = (x + i * stride, x + j * stride)
                    var k = 0
                    while k + 4 <= length {
                        lanes.0.addProduct(xi[k].double, xj[k].double)
                        lanes.1.addProduct(xi[k + 1].double, xj[k + 1].double)
                        lanes.2.addProduct(xi[k + 2].double, xj[k + 2].double)
                        lanes.3.addProduct(xi[k + 3].double, xj[k + 3].double)
                        k += 4
                    }
                    if k < length { lanes.0.addProduct(xi[k].double, xj[k].double) }
                    if k + 1 < length { lanes.1.addProduct(xi[k + 1].double, xj[k + 1].double) }
                    if k + 2 < length { lanes.2.addProduct(xi[k + 2].double, xj[k + 2].double) }
                    gram[i * count + j] = (lanes.0 + lanes.1) + (lanes.2 + lanes.3)
                }
            }
        }
    }

    /// `gram[i·count + j]` for `i ≤ j` is `Σ_r x[r][i]·x[r][j]` of the `count` columns of the
    /// `rows × count` matrix at `x` (row r at `x + r·stride`; Float32 as in `ofRows`): one chain of
    /// fused multiply-adds in row order. Entries below the diagonal are unspecified. `scratch` has
    /// room for `min(rows, passLength) · count` elements (Float32 is widened there a pass at a time).
    static func ofColumns<Element: GramElement>(
        _ x: UnsafePointer<Element>, stride: Int, count: Int, rows: Int, into gram: UnsafeMutablePointer<Double>,
        scratch: UnsafeMutablePointer<Double>, kernels: KernelSet
    ) {
        switch kernels {
        case .avx2:
            Element.vectorisedGramOfColumns(x, stride, count, rows, gram, scratch)
        case .portable:
            for i in 0..<count {
                for j in i..<count {
                    var sum = 0.0
                    for r in 0..<rows { sum.addProduct(x[r * stride + i].double, x[r * stride + j].double) }
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

/// What the Gram matrices read: Float64, or Float32 (an upload's own F32 factors, with no decoding
/// pass) converted exactly as it is read (the Gram of columns widens it a pass at a time).
protocol GramElement {
    typealias RowsKernel = (UnsafePointer<Self>, Int, Int, Int, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>) -> Void
    typealias ColumnsKernel = (UnsafePointer<Self>, Int, Int, Int, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>) -> Void
    var double: Double { get }
    static var vectorisedGramOfRows: RowsKernel { get }
    static var vectorisedGramOfColumns: ColumnsKernel { get }
}

extension Double: GramElement {
    var double: Double { self }
    // Float64 columns are read where they lie: no scratch.
    static var vectorisedGramOfRows: RowsKernel { ckernels_gram_of_rows_f64 }
    static var vectorisedGramOfColumns: ColumnsKernel { { x, stride, count, rows, gram, _ in ckernels_gram_of_columns_f64(x, stride, count, rows, gram) } }
}

extension Float: GramElement {
    var double: Double { Double(self) }
    static var vectorisedGramOfRows: RowsKernel { ckernels_gram_of_rows_f32 }
    static var vectorisedGramOfColumns: ColumnsKernel { ckernels_gram_of_columns_f32 }
}
