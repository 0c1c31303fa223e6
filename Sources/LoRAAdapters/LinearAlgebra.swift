import CLAPACK

/// A dense Float64 matrix, column-major as LAPACK takes it: element (i, j) at `i + j·rows`.
struct Matrix {
    let rows: Int
    let columns: Int
    var values: [Double]

    init(rows: Int, columns: Int) {
        self.rows = rows
        self.columns = columns
        values = [Double](repeating: 0, count: rows * columns)
    }

    init(rows: Int, columns: Int, values: [Double]) {
        precondition(values.count == rows * columns, "a matrix's values are rows × columns")
        self.rows = rows
        self.columns = columns
        self.values = values
    }

    subscript(row: Int, column: Int) -> Double {
        get { values[row + column * rows] }
        set { values[row + column * rows] = newValue }
    }
}

/// The LAPACK and BLAS calls of the svd strategy, on OpenBLAS with one thread per
/// call: every sum then runs in one order, so a result depends only on the inputs and the build.
enum LinearAlgebra {
    private static let singleThreaded: Void = openblas_set_num_threads(1)

    /// The OpenBLAS build and the kernels it chose for this CPU (OpenBLAS picks them per CPU family,
    /// and their sums round differently): besides the inputs, what decides the bits of the results.
    static let implementation = "\(String(cString: openblas_get_config())) \(String(cString: openblas_get_corename()))"

    /// The Householder QR `a = q·r` (`dgeqrf`): `r` is k × columns upper triangular, k = min(rows,
    /// columns), and `q` stays as its reflectors in `a`'s storage (factored in place and taken, `a`
    /// left empty, so a large stack is never copied), applied by `timesQ` instead of formed: the svd
    /// strategy needs only `q` times a few columns, a third of the arithmetic of forming `q`
    /// (`dorgqr`) and multiplying.
    struct HouseholderQR {
        let r: Matrix
        /// `dormqr` writes into them while it runs (restoring what it changed), hence `mutating` below.
        private var reflectors: Matrix
        private let tau: [Double]

        init(factoring a: inout Matrix) throws(AdapterError) {
            _ = singleThreaded
            let (rows, columns) = (a.rows, a.columns)
            let k = min(rows, columns)
            var r = Matrix(rows: k, columns: columns)
            var tau = [Double](repeating: 0, count: k)
            if k > 0 {
                var (m, n, lda) = (Int32(rows), Int32(columns), Int32(rows))
                var info: Int32 = 0
                try withWorkspace { work, lwork in dgeqrf_(&m, &n, &a.values, &lda, &tau, work, lwork, &info) }
                try check(info, "dgeqrf")
                for column in 0..<columns {
                    for row in 0...min(column, k - 1) { r[row, column] = a[row, column] }
                }
            }
            self.r = r
            self.tau = tau
            reflectors = a
            a = Matrix(rows: 0, columns: 0)
        }

        /// The thin `q` (rows × k, orthonormal columns) times `c` (k × p): `dormqr` applies the
        /// reflectors to `c` padded with zero rows to rows × p.
        mutating func timesQ(_ c: Matrix) throws(AdapterError) -> Matrix {
            _ = singleThreaded
            precondition(c.rows == tau.count, "q's columns times c's rows")
            var product = Matrix(rows: reflectors.rows, columns: c.columns)
            guard c.columns > 0, reflectors.rows > 0 else { return product }
            for column in 0..<c.columns {
                for row in 0..<c.rows { product[row, column] = c[row, column] }
            }
            guard !tau.isEmpty else { return product }
            var (m, n, k, lda, ldc) = (Int32(reflectors.rows), Int32(c.columns), Int32(tau.count), Int32(reflectors.rows), Int32(reflectors.rows))
            var (side, trans) = (CChar(UInt8(ascii: "L")), CChar(UInt8(ascii: "N")))
            var info: Int32 = 0
            try withWorkspace { work, lwork in
                dormqr_(&side, &trans, &m, &n, &k, &reflectors.values, &lda, tau, &product.values, &ldc, work, lwork, &info, 1, 1)
            }
            try check(info, "dormqr")
            return product
        }
    }

    /// The thin SVD `a = u·diag(s)·vt` (`dgesdd`), singular values descending.
    static func svd(_ a: Matrix) throws(AdapterError) -> (u: Matrix, s: [Double], vt: Matrix) {
        _ = singleThreaded
        let k = min(a.rows, a.columns)
        var u = Matrix(rows: a.rows, columns: k)
        var vt = Matrix(rows: k, columns: a.columns)
        var s = [Double](repeating: 0, count: k)
        guard k > 0 else { return (u, s, vt) }
        var copy = a.values
        var (m, n, lda, ldu, ldvt) = (Int32(a.rows), Int32(a.columns), Int32(a.rows), Int32(a.rows), Int32(k))
        var iwork = [Int32](repeating: 0, count: 8 * k)
        var info: Int32 = 0
        var job = CChar(UInt8(ascii: "S"))
        try withWorkspace { work, lwork in
            dgesdd_(&job, &m, &n, &copy, &lda, &s, &u.values, &ldu, &vt.values, &ldvt, work, lwork, &iwork, &info, 1)
        }
        try check(info, "dgesdd")
        return (u, s, vt)
    }

    /// `a·bᵀ` (`dgemm`): svd's core, the product of the two stacks' `r` factors.
    static func multiplyTransposed(_ a: Matrix, _ b: Matrix) -> Matrix {
        _ = singleThreaded
        let (m, k, n) = (a.rows, a.columns, b.rows)
        var c = Matrix(rows: m, columns: n)
        guard m > 0, n > 0, k > 0 else { return c }
        var (mm, nn, kk, lda, ldb, ldc) = (Int32(m), Int32(n), Int32(k), Int32(max(1, a.rows)), Int32(max(1, b.rows)), Int32(m))
        var (alpha, beta) = (1.0, 0.0)
        var (opA, opB) = (CChar(UInt8(ascii: "N")), CChar(UInt8(ascii: "T")))
        dgemm_(&opA, &opB, &mm, &nn, &kk, &alpha, a.values, &lda, b.values, &ldb, &beta, &c.values, &ldc, 1, 1)
        return c
    }

    /// Runs `call` once to ask for the workspace size, then with a workspace of that size.
    private static func withWorkspace(_ call: (UnsafeMutablePointer<Double>, UnsafeMutablePointer<Int32>) -> Void) throws(AdapterError) {
        var query = 0.0
        var size: Int32 = -1
        call(&query, &size)
        var work = [Double](repeating: 0, count: max(1, Int(query)))
        size = Int32(work.count)
        work.withUnsafeMutableBufferPointer { call($0.baseAddress!, &size) }
    }

    private static func check(_ info: Int32, _ routine: String) throws(AdapterError) {
        guard info == 0 else { throw AdapterError(.numericalFailure, "LAPACK \(routine) failed (info \(info))") }
    }
}
