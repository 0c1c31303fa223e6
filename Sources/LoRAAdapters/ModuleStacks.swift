import Dispatch

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

/// HetLoRA's weights (Cho et al. 2024; openapi.yaml, `hetlora`): per module, each holder's
/// `‖B̃·Ã‖_F`, from the r × r Gram matrices: `‖B̃Ã‖²_F = trace((B̃ᵀB̃)(ÃÃᵀ))`. One instance serves
/// every module of an aggregation, reusing its decoding buffer (a fresh one per module would cost
/// more in page faults than the Gram matrices cost in arithmetic).
final class HetLoRANorms {
    private var scratch: [Double] = []

    /// Client id → norm of its folded update, for the module of plans `a` and `b`. Each holder's
    /// tensors are decoded as they are laid out: A `[r, n]` row-major is the column-major n × r matrix
    /// whose Gram of columns is `AAᵀ`; B `[out, r]` row-major is the column-major r × out matrix whose
    /// Gram of rows is `BᵀB` (a conv B, `[out, r, rest…]`, is gathered into `out·rest × r` first).
    /// The Gram matrices, most of the work, are computed on all cores, one holder per task.
    func norms(a: TensorPlan, b: TensorPlan, from source: some AdapterSource) throws -> [String: Double] {
        try TensorPlan.checkPaired(a, b)
        let holders = a.holders
        // Each holder's A (n × r) then B (r × out, or out·rest × r for a conv B), back to back.
        let (columns, rows) = (a.inner, b.outer * b.inner)
        var layout: [(a: Range<Int>, b: Range<Int>)] = []
        var end = 0
        for holder in holders {
            let aRegion = end..<(end + holder.rank * columns)
            layout.append((aRegion, aRegion.upperBound..<(aRegion.upperBound + holder.rank * rows)))
            end = layout.last!.b.upperBound
        }
        let regions = layout
        let gatherSize = b.inner > 1 ? (holders.map(\.rank).max() ?? 0) * rows : 0
        if scratch.count < end + gatherSize { scratch = [Double](repeating: 0, count: end + gatherSize) }
        try scratch.withUnsafeMutableBufferPointer { scratch in
            let base = scratch.baseAddress!
            try a.forEachHolder(in: source) { index, holder, bytes in
                guard let origin = bytes.baseAddress else { return }
                holder.dtype.decode(origin, count: regions[index].a.count, times: 1, into: base + regions[index].a.lowerBound)
            }
            try b.forEachHolder(in: source) { index, holder, bytes in
                guard let origin = bytes.baseAddress else { return }
                let destination = base + regions[index].b.lowerBound
                guard b.inner > 1 else { return holder.dtype.decode(origin, count: regions[index].b.count, times: 1, into: destination) }
                holder.dtype.decode(origin, count: regions[index].b.count, times: 1, into: base + end)
                b.gatherColumns(base + end, rank: holder.rank, into: destination)
            }
        }
        var squared = [Double](repeating: 0, count: holders.count)
        scratch.withUnsafeBufferPointer { scratch in
            squared.withUnsafeMutableBufferPointer { squared in
                // Each task reads its own regions and writes only its own index; concurrentPerform
                // returns once every task is done.
                nonisolated(unsafe) let (input, results) = (scratch, squared)
                DispatchQueue.concurrentPerform(iterations: holders.count) { index in
                    let rank = holders[index].rank
                    guard rank > 0, !regions[index].a.isEmpty, !regions[index].b.isEmpty else { return }
                    let gramA = LinearAlgebra.gram(input.baseAddress! + regions[index].a.lowerBound, rows: columns, columns: rank, ofColumns: true)
                    let bValues = input.baseAddress! + regions[index].b.lowerBound
                    let gramB =
                        b.inner > 1
                        ? LinearAlgebra.gram(bValues, rows: rows, columns: rank, ofColumns: true)
                        : LinearAlgebra.gram(bValues, rows: rank, columns: rows, ofColumns: false)
                    // trace(G_B·G_A) of two symmetric matrices from their upper triangles.
                    var sum = 0.0
                    for j in 0..<rank {
                        for i in 0...j { sum += (i == j ? 1 : 2) * gramA[i + j * rank] * gramB[i + j * rank] }
                    }
                    results[index] = sum
                }
            }
        }
        var norms: [String: Double] = [:]
        for (holder, squared) in zip(holders, squared) {
            let scale = (holder.foldedWeight / holder.weight) * (holder.foldedWeight / holder.weight)
            norms[holder.clientID] = scale * max(0, squared).squareRoot()
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

    /// The stacks of `√(w/Σw)·B̃` and `√(w/Σw)·Ã` the factors are computed from (read on the
    /// caller's thread: sources are not shared between threads).
    static func stacks(a: TensorPlan, b: TensorPlan, from source: some AdapterSource) throws -> ModuleStacks {
        let totalWeight = a.holders.reduce(0) { $0 + $1.weight }
        return try ModuleStacks.read(a: a, b: b, from: source) { ($0.weight / totalWeight).squareRoot() * ($0.foldedWeight / $0.weight) }
    }

    /// Factors the stacks (consumed: the QRs overwrite them) at `rank`; pure computation, on any thread.
    init(_ input: consuming ModuleStacks, rank: Int) throws {
        // Moved, not copied: the QRs below write into the stacks, and a second reference would make
        // them copy a whole stack first.
        var stacks = consume input
        self.b = Matrix(rows: stacks.b.rows, columns: rank)
        aTransposed = Matrix(rows: stacks.aTransposed.rows, columns: rank)
        guard !stacks.blocks.isEmpty else { return }  // only the base holds it: svd ignores the base
        let (qB, rB) = try LinearAlgebra.thinQR(&stacks.b)
        let (qA, rA) = try LinearAlgebra.thinQR(&stacks.aTransposed)
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

/// One module's factoring, started on a worker (outside `FactorPipeline`, whose generic source
/// type a worker's closure must not capture).
private final class PendingFactoring: @unchecked Sendable {
    // @unchecked: `result` is written once on the worker before `done` is signalled and read
    // only after waiting on it.
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<LowRankFactors, any Error>?

    init(_ stacks: consuming ModuleStacks, rank: Int) {
        // The worker takes the stacks out of the box, so it holds their only reference.
        let box = Box(consume stacks)
        DispatchQueue.global().async { [self] in
            result = Result { try LowRankFactors(box.take(), rank: rank) }
            done.signal()
        }
    }

    private final class Box: @unchecked Sendable {
        // @unchecked: filled before the worker starts and emptied by it alone.
        private var stacks: ModuleStacks?
        init(_ stacks: consuming ModuleStacks) { self.stacks = consume stacks }
        func take() -> ModuleStacks {
            defer { stacks = nil }
            return stacks.take()!
        }
    }

    func wait() throws -> LowRankFactors {
        done.wait()
        return try result!.get()
    }
}

/// The svd strategy's modules factored two at a time, in the engine's order: a module's stacks are
/// read on the engine's thread (a source is never shared between threads), its factoring runs on a
/// worker while the engine reads the next module's stacks, factors it on a second worker, and
/// writes tensors. Each factoring call runs OpenBLAS on one thread, so results do not depend on this.
final class FactorPipeline<Source: AdapterSource> {
    private let pairs: [String: (a: TensorPlan, b: TensorPlan)]
    private let order: [String]
    private let rank: (String) -> Int
    private let source: Source
    private var started: [String: PendingFactoring] = [:]
    /// Factors of modules whose first tensor is written and second is not.
    private var ready: [String: LowRankFactors] = [:]

    /// - Parameter order: the modules in the order the engine writes their tensors.
    init(pairs: [String: (a: TensorPlan, b: TensorPlan)], order: [String], rank: @escaping (String) -> Int, source: Source) {
        self.pairs = pairs
        self.order = order
        self.rank = rank
        self.source = source
    }

    /// The module's factors; for its first tensor, this also starts the next module's factoring.
    func factors(of module: String) throws -> LowRankFactors {
        if let factors = ready.removeValue(forKey: module) { return factors }
        try start(module)
        if let position = order.firstIndex(of: module), position + 1 < order.count { try start(order[position + 1]) }
        let factors = try started.removeValue(forKey: module)!.wait()
        ready[module] = factors
        return factors
    }

    private func start(_ module: String) throws {
        guard started[module] == nil, ready[module] == nil, let pair = pairs[module] else { return }
        started[module] = PendingFactoring(try LowRankFactors.stacks(a: pair.a, b: pair.b, from: source), rank: rank(module))
    }
}
