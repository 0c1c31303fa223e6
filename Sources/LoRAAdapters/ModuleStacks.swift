/// One LoRA module's factors across the round's holders, side by side (openapi.yaml, `svd`): each
/// holder's B̃ as columns of an m × Σr matrix and each row of its Ã as a column of an n × Σr matrix,
/// further axes of conv factors flattened (into B's rows and A's columns), each holder's block
/// scaled by its own factor. Memory is one module × Σ ranks; the dense `m × n` product never exists.
struct ModuleStacks {
    /// m × Σr: B̃ of each holder, in client-id order.
    var b: Matrix
    /// n × Σr: Ãᵀ of each holder, in the same order.
    var aTransposed: Matrix
    /// Each holder's columns in both.
    let blocks: [Range<Int>]

    /// Reads the module's A and B tensors (plans `a` and `b`, the same holders) from `source`.
    static func read(a: TensorPlan, b: TensorPlan, from source: some AdapterSource, scale: (TensorPlan.Holder) -> Double) throws -> ModuleStacks {
        try TensorPlan.checkPaired(a, b)
        var blocks: [Range<Int>] = []
        var offset = 0
        for holder in a.holders {
            blocks.append(offset..<(offset + holder.rank))
            offset += holder.rank
        }
        let columns = a.inner
        // B [out, r, rest…]: row (o, rest) of the m × r matrix, m = out · rest.
        let rest = b.inner
        var stacks = ModuleStacks(b: Matrix(rows: b.outer * rest, columns: offset), aTransposed: Matrix(rows: columns, columns: offset), blocks: blocks)
        // Aᵀ: row j of a holder's A is one contiguous column of the stack.
        try a.forEachHolder(in: source) { index, holder, bytes in
            guard let origin = bytes.baseAddress else { return }  // an empty tensor
            let factor = scale(holder)
            stacks.aTransposed.values.withUnsafeMutableBufferPointer { values in
                holder.dtype.decode(origin, count: holder.rank * columns, times: factor, into: values.baseAddress! + blocks[index].lowerBound * columns)
            }
        }
        // B: decoded whole, then each run of `rest` elements to its column.
        let rows = stacks.b.rows
        var decoded: [Double] = []
        try b.forEachHolder(in: source) { index, holder, bytes in
            guard bytes.baseAddress != nil else { return }  // an empty tensor
            let count = b.outer * holder.rank * rest
            if decoded.count < count { decoded = [Double](repeating: 0, count: count) }
            decoded.withUnsafeMutableBufferPointer { holder.dtype.decode(bytes.baseAddress!, count: count, times: scale(holder), into: $0.baseAddress!) }
            stacks.b.values.withUnsafeMutableBufferPointer { values in
                decoded.withUnsafeBufferPointer { decoded in
                    b.gatherColumns(decoded.baseAddress!, rank: holder.rank, into: values.baseAddress! + blocks[index].lowerBound * rows)
                }
            }
        }
        return stacks
    }
}

/// The svd strategy for one module (openapi.yaml, `svd`): the best rank-R approximation of
/// `M = Σ w·B̃·Ã / Σ w` as balanced factors `B = U·√Σ`, `A = √Σ·Vᵀ`, singular values descending,
/// each component's sign making the largest-magnitude entry of its B column (the first on ties)
/// positive, components past the rank of `M` (σ ≤ 1e-12·σ₁) zero. Computed from thin QRs of the
/// stacks and the SVD of the small Σr × Σr core, never from `M`.
struct LowRankFactors {
    /// m × R.
    var b: Matrix
    /// n × R: row j of A is column j here.
    var aTransposed: Matrix

    static let negligible = 1e-12

    /// The stacks of `√(w/Σw)·B̃` and `√(w/Σw)·Ã` the factors are computed from (read on the
    /// caller's thread: sources are not shared between threads).
    static func stacks(a: TensorPlan, b: TensorPlan, from source: some AdapterSource) throws -> ModuleStacks {
        let totalWeight = a.holders.reduce(0) { $0 + $1.weight }
        return try ModuleStacks.read(a: a, b: b, from: source) { ($0.weight / totalWeight).squareRoot() * ($0.foldedWeight / $0.weight) }
    }

    /// Factors the stacks (consumed: the QRs overwrite them) at `rank`; pure computation, on any thread.
    init(_ input: consuming ModuleStacks, rank: Int) throws {
        // Moved, not copied: the QRs below write into the stacks and keep them, and a second
        // reference would make them copy a whole stack first.
        var stacks = consume input
        self.b = Matrix(rows: stacks.b.rows, columns: rank)
        aTransposed = Matrix(rows: stacks.aTransposed.rows, columns: rank)
        guard !stacks.blocks.isEmpty else { return }  // only the base holds it: svd ignores the base
        var qrB = try LinearAlgebra.HouseholderQR(factoring: &stacks.b)
        var qrA = try LinearAlgebra.HouseholderQR(factoring: &stacks.aTransposed)
        let (u, sigma, vt) = try LinearAlgebra.svd(LinearAlgebra.multiplyTransposed(qrB.r, qrA.r))
        let kept = sigma.prefix(rank).prefix { $0 > Self.negligible * sigma[0] && $0 > 0 }.count
        guard kept > 0 else { return }
        var uKept = Matrix(rows: u.rows, columns: kept)
        uKept.values = Array(u.values[0..<(u.rows * kept)])
        var vKept = Matrix(rows: vt.columns, columns: kept)
        for j in 0..<kept {
            for i in 0..<vt.columns { vKept[i, j] = vt[j, i] }
        }
        let bKept = try qrB.timesQ(uKept)
        let aKept = try qrA.timesQ(vKept)
        for j in 0..<kept {
            let root = sigma[j].squareRoot()
            // The sign rule: the first entry of largest magnitude in B's column is positive.
            var largest = 0
            for i in 0..<bKept.rows where abs(bKept[i, j]) > abs(bKept[largest, j]) { largest = i }
            let sign: Double = bKept.rows > 0 && bKept[largest, j] < 0 ? -1 : 1
            for i in 0..<bKept.rows { self.b[i, j] = sign * root * bKept[i, j] }
            for i in 0..<aKept.rows { aTransposed[i, j] = sign * root * aKept[i, j] }
        }
    }

    /// Writes the plan's tensor (A or B of this module, at the plan's output rank) into `sums`, laid
    /// out as the plan's `[outer, rank, inner]`.
    func fill(_ plan: TensorPlan, into sums: UnsafeMutableBufferPointer<Double>) {
        let rank = plan.outputRank
        if plan.factor == .a {
            for j in 0..<rank {
                for column in 0..<plan.inner { sums[j * plan.inner + column] = aTransposed[column, j] }
            }
        } else {
            for o in 0..<plan.outer {
                for j in 0..<rank {
                    for x in 0..<plan.inner { sums[(o * rank + j) * plan.inner + x] = b[o * plan.inner + x, j] }
                }
            }
        }
    }
}
