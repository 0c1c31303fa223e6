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
        guard a.holders.map(\.clientID) == b.holders.map(\.clientID), zip(a.holders, b.holders).allSatisfy({ $0.rank == $1.rank }) else {
            throw AdapterError(.inconsistentSource, "the module's A and B tensors have different holders or ranks", tensor: a.name)
        }
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
        try read(a, from: source) { index, holder, element in
            let factor = scale(holder)
            let block = blocks[index]
            stacks.aTransposed.values.withUnsafeMutableBufferPointer { values in
                for j in 0..<holder.rank {
                    let destination = (block.lowerBound + j) * columns
                    for column in 0..<columns { values[destination + column] = factor * element(j * columns + column) }
                }
            }
        }
        let rows = stacks.b.rows
        try read(b, from: source) { index, holder, element in
            let factor = scale(holder)
            let block = blocks[index]
            stacks.b.values.withUnsafeMutableBufferPointer { values in
                for o in 0..<b.outer {
                    for j in 0..<holder.rank {
                        let destination = (block.lowerBound + j) * rows + o * rest
                        let source = (o * holder.rank + j) * rest
                        for x in 0..<rest { values[destination + x] = factor * element(source + x) }
                    }
                }
            }
        }
        return stacks
    }

    /// Calls `body` with each holder's index, the holder, and its elements decoded to Float64.
    private static func read(
        _ plan: TensorPlan, from source: some AdapterSource, _ body: (Int, TensorPlan.Holder, (Int) -> Double) throws -> Void
    ) throws {
        var next = 0
        try source.forEachContribution(toTensor: plan.name) { contribution in
            guard next < plan.holders.count, plan.holders[next].clientID == contribution.clientID, contribution.shape == plan.holders[next].shape,
                contribution.dtype == plan.holders[next].dtype, contribution.bytes.count == contribution.shape.reduce(1, *) * contribution.dtype.byteWidth
            else {
                throw AdapterError(.inconsistentSource, "the source delivered client '\(contribution.clientID)' out of order or unannounced", tensor: plan.name)
            }
            let bytes = contribution.bytes
            try body(next, plan.holders[next]) { contribution.dtype.value(in: bytes, at: $0) }
            next += 1
        }
        guard next == plan.holders.count else {
            throw AdapterError(.inconsistentSource, "the source delivered \(next) of \(plan.holders.count) announced clients", tensor: plan.name)
        }
    }

    /// Each holder's block of the B stack or the Aᵀ stack, as its own matrix.
    func block(_ index: Int, of matrix: Matrix) -> Matrix {
        var result = Matrix(rows: matrix.rows, columns: blocks[index].count)
        result.values = Array(matrix.values[(blocks[index].lowerBound * matrix.rows)..<(blocks[index].upperBound * matrix.rows)])
        return result
    }
}

/// HetLoRA's weights (Cho et al. 2024; openapi.yaml, `hetlora`): per module, each holder's
/// `‖B̃·Ã‖_F`, from the r × r Gram matrices: `‖B̃Ã‖²_F = trace((B̃ᵀB̃)(ÃÃᵀ))`.
enum HetLoRANorms {
    /// Client id → norm of its folded update, for the module of plans `a` and `b`.
    static func norms(a: TensorPlan, b: TensorPlan, from source: some AdapterSource) throws -> [String: Double] {
        let stacks = try ModuleStacks.read(a: a, b: b, from: source) { $0.foldedWeight / $0.weight }
        var norms: [String: Double] = [:]
        for (index, holder) in a.holders.enumerated() {
            let bBlock = stacks.block(index, of: stacks.b)
            let aBlock = stacks.block(index, of: stacks.aTransposed)
            let gramB = LinearAlgebra.multiply(bBlock, bBlock, transposingA: true)
            let gramA = LinearAlgebra.multiply(aBlock, aBlock, transposingA: true)
            // Both symmetric: the trace of their product is the sum of their elementwise product.
            let squared = zip(gramB.values, gramA.values).reduce(0) { $0 + $1.0 * $1.1 }
            norms[holder.clientID] = max(0, squared).squareRoot()
        }
        return norms
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

    init(a: TensorPlan, b: TensorPlan, rank: Int, from source: some AdapterSource) throws {
        let totalWeight = a.holders.reduce(0) { $0 + $1.weight }
        let stacks = try ModuleStacks.read(a: a, b: b, from: source) { ($0.weight / totalWeight).squareRoot() * ($0.foldedWeight / $0.weight) }
        self.b = Matrix(rows: stacks.b.rows, columns: rank)
        aTransposed = Matrix(rows: stacks.aTransposed.rows, columns: rank)
        guard !a.holders.isEmpty else { return }  // only the base holds it: svd ignores the base
        let (qB, rB) = try LinearAlgebra.thinQR(stacks.b)
        let (qA, rA) = try LinearAlgebra.thinQR(stacks.aTransposed)
        let (u, sigma, vt) = try LinearAlgebra.svd(LinearAlgebra.multiply(rB, rA, transposingB: true))
        let kept = sigma.prefix(rank).prefix { $0 > Self.negligible * sigma[0] && $0 > 0 }.count
        guard kept > 0 else { return }
        var uKept = Matrix(rows: u.rows, columns: kept)
        uKept.values = Array(u.values[0..<(u.rows * kept)])
        var vKept = Matrix(rows: vt.columns, columns: kept)
        for j in 0..<kept {
            for i in 0..<vt.columns { vKept[i, j] = vt[j, i] }
        }
        let bKept = LinearAlgebra.multiply(qB, uKept)
        let aKept = LinearAlgebra.multiply(qA, vKept)
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
