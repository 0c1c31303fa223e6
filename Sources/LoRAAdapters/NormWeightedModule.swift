/// The hetlora strategy for one LoRA module (Cho et al. 2024; openapi.yaml, `hetlora`): zero padding
/// with each holder's weight replaced by the norm of its folded update `‖B̃·Ã‖_F`, from the r × r
/// Gram matrices (`‖B̃Ã‖²_F = trace((B̃ᵀB̃)(ÃÃᵀ))`), never the dense product (unless the rank is so
/// far above the module's size that the Grams would be the larger).
///
/// The module's factors are read once, on the engine's thread; a worker then takes the holders in
/// client-id order, computes each one's norm (`Gram`: the same bits on every CPU), then adds the
/// weighted factors to the sums a block at a time. The sums are the engine's (the same products
/// added in the same order), so the bytes equal a norm pass followed by the engine's zero padding.
final class NormWeightedModule: @unchecked Sendable {
    // @unchecked: built on a worker and only read after it is handed over.

    /// The module's plans with the norms as weights (the upload weights when every norm is 0).
    let a: TensorPlan
    let b: TensorPlan
    /// `Σ w·x̃` of each plan; nil when every norm is 0: the engine then aggregates the plans from
    /// the source as it does for zero padding.
    private let sums: (a: UnsafeMutableBufferPointer<Double>, b: UnsafeMutableBufferPointer<Double>)?
    private let pool: BufferPool

    /// The module's A and B tensors of every holder, as uploaded, copied out of the source.
    final class Input: @unchecked Sendable {
        // @unchecked: filled on the engine's thread, then handed to one worker.
        let a: TensorPlan
        let b: TensorPlan
        /// Each holder's A `[r, n…]` then its B `[out, r, rest…]`, in its dtype, back to back.
        let bytes: UnsafeMutableRawBufferPointer
        let regions: [(a: Range<Int>, b: Range<Int>)]
        let pool: BufferPool

        /// Reads plans `a` and `b` (the same holders) from `source`, on the caller's thread.
        init(a: TensorPlan, b: TensorPlan, from source: some AdapterSource, pool: BufferPool) throws {
            try TensorPlan.checkPaired(a, b)
            self.a = a
            self.b = b
            self.pool = pool
            var regions: [(a: Range<Int>, b: Range<Int>)] = []
            var end = 0
            // Each region starts 8-byte aligned, so an F32 factor is read as Floats where it lies.
            let aligned = { (offset: Int) in (offset + 7) & ~7 }
            for holder in a.holders {
                let width = holder.dtype.byteWidth
                let aRegion = aligned(end)..<(aligned(end) + holder.rank * a.inner * width)
                let bStart = aligned(aRegion.upperBound)
                regions.append((aRegion, bStart..<(bStart + b.outer * holder.rank * b.inner * width)))
                end = regions.last!.b.upperBound
            }
            self.regions = regions
            let bytes = pool.take(byteCount: end)
            self.bytes = bytes
            for (plan, isA) in [(a, true), (b, false)] {
                // Read straight into the buffer where the source reads (the store does), else copied.
                try source.withContributionReader(toTensor: plan.name) { contributions, reader in
                    _ = try plan.checkedHolders(contributions)
                    for index in contributions.indices {
                        let region = isA ? regions[index].a : regions[index].b
                        guard !region.isEmpty else { continue }
                        let destination = bytes.baseAddress! + region.lowerBound
                        try reader.withBytes(ofHolder: index, in: 0..<region.count, scratch: destination) { read in
                            if read != UnsafeRawPointer(destination) { destination.copyMemory(from: read, byteCount: region.count) }
                        }
                    }
                }
            }
        }

        deinit { pool.recycle(bytes) }
    }

    /// Computes the norms and the weighted sums (on a worker: pure computation).
    init(_ input: Input, kernels: KernelSet) {
        let (a, b) = (input.a, input.b)
        pool = input.pool
        // Pooled buffers are kept whole (they go back whole); only their first elements are used.
        let (sumsA, sumsB) = (pool.take(a.outputElementCount), pool.take(b.outputElementCount))
        // One holder's factors for the Grams: A `[r, n]` as r rows of n; a linear B `[out, r]` as out
        // rows of r (F32 factors where they lie, others decoded to Float64 in `factor`); a conv B
        // `[out, r, rest…]` decoded into `decodedB`, then gathered into r rows of out·rest. A rank
        // above the module's size (r² > out·rest·n) takes the product itself instead of the r × r
        // Grams, so memory stays within the size of the uploads' own factors.
        let rows = b.outer * b.inner
        let usesGrams = { (rank: Int) in rank * rank <= rows * a.inner }
        let largestRank = a.holders.map(\.rank).max() ?? 0
        let largestGram = a.holders.map(\.rank).filter(usesGrams).max() ?? 0
        let factor = pool.take(largestRank * max(a.inner, rows))
        let decodedB = pool.take(b.inner > 1 || !usesGrams(largestRank) ? largestRank * rows : 0)
        let (gramA, gramB) = (pool.take(largestGram * largestGram), pool.take(largestGram * largestGram))
        let productRow = pool.take(usesGrams(largestRank) ? 0 : a.inner)
        // One pass of an F32 B widened for the Gram of columns.
        let widened = pool.take(largestGram * min(rows, Gram.passLength))
        defer { for buffer in [factor, decodedB, gramA, gramB, productRow, widened] { pool.recycle(buffer) } }
        var norms: [String: Double] = [:]
        var weights: [Double] = []
        for (index, holder) in a.holders.enumerated() {
            let (aBytes, bBytes) = (input.bytes.baseAddress! + input.regions[index].a.lowerBound, input.bytes.baseAddress! + input.regions[index].b.lowerBound)
            let r = holder.rank
            var squared = 0.0
            if r > 0, !input.regions[index].a.isEmpty {
                if !usesGrams(r) {
                    holder.dtype.decode(aBytes, count: r * a.inner, times: 1, into: factor.baseAddress!)
                    holder.dtype.decode(bBytes, count: r * rows, times: 1, into: decodedB.baseAddress!)
                    squared = Self.squaredNormOfProduct(b: decodedB.baseAddress!, a: factor.baseAddress!, rank: r, b, a, row: productRow.baseAddress!)
                } else {
                    if holder.dtype == .f32 {
                        // An upload's own F32 values: no decoding pass (the Grams convert as they read).
                        let floats = UnsafeRawPointer(aBytes).bindMemory(to: Float.self, capacity: r * a.inner)
                        Gram.ofRows(floats, stride: a.inner, count: r, length: a.inner, into: gramA.baseAddress!, kernels: kernels)
                    } else {
                        holder.dtype.decode(aBytes, count: r * a.inner, times: 1, into: factor.baseAddress!)
                        Gram.ofRows(factor.baseAddress!, stride: a.inner, count: r, length: a.inner, into: gramA.baseAddress!, kernels: kernels)
                    }
                    if b.inner == 1, holder.dtype == .f32 {
                        let floats = UnsafeRawPointer(bBytes).bindMemory(to: Float.self, capacity: r * rows)
                        Gram.ofColumns(floats, stride: r, count: r, rows: rows, into: gramB.baseAddress!, scratch: widened.baseAddress!, kernels: kernels)
                    } else if b.inner > 1 {
                        holder.dtype.decode(bBytes, count: r * rows, times: 1, into: decodedB.baseAddress!)
                        b.gatherColumns(decodedB.baseAddress!, rank: r, into: factor.baseAddress!)
                        Gram.ofRows(factor.baseAddress!, stride: rows, count: r, length: rows, into: gramB.baseAddress!, kernels: kernels)
                    } else {
                        holder.dtype.decode(bBytes, count: r * rows, times: 1, into: factor.baseAddress!)
                        Gram.ofColumns(
                            factor.baseAddress!, stride: r, count: r, rows: rows, into: gramB.baseAddress!, scratch: widened.baseAddress!, kernels: kernels)
                    }
                    squared = Gram.traceOfProduct(gramA.baseAddress!, gramB.baseAddress!, count: r)
                }
            }
            // The norm of the folded update: both factors carry √s. Written as the first version
            // computed it (not foldingRoot²), which can differ in the last bit.
            let scale = (holder.foldedWeight / holder.weight) * (holder.foldedWeight / holder.weight)
            let norm = scale * max(0, squared).squareRoot()
            norms[holder.clientID] = norm
            // The weight `reweighted` gives this holder unless every norm is 0 (then the sums are dropped).
            weights.append(holder.reweighted(norm).foldedWeight)
        }
        // The weighted sums, a block of output elements at a time, each holder's factors added in
        // client order (so each element gets the engine's sum): the block stays in L2 while every
        // holder adds to it, instead of each holder sweeping all of the module's sums through L3.
        for (plan, sums, isA) in [(a, sumsA, true), (b, sumsB, false)] {
            for blockStart in stride(from: 0, to: plan.outputElementCount, by: Self.sumsBlock) {
                let block = blockStart..<min(plan.outputElementCount, blockStart + Self.sumsBlock)
                UnsafeMutableBufferPointer(rebasing: sums[block]).update(repeating: 0)
                for (index, holder) in plan.holders.enumerated() {
                    let region = isA ? input.regions[index].a : input.regions[index].b
                    plan.add(
                        input.bytes.baseAddress! + region.lowerBound, dtype: holder.dtype, clientRank: holder.rank,
                        slices: 0..<min(holder.rank, plan.outputRank), weight: weights[index], into: sums, kernels: kernels, range: block)
                }
            }
        }
        self.a = a.reweighted(norms)
        self.b = b.reweighted(norms)
        if norms.values.contains(where: { $0 > 0 }) {
            sums = (sumsA, sumsB)
        } else {
            sums = nil
            pool.recycle(sumsA)
            pool.recycle(sumsB)
        }
    }

    /// Output elements summed together: 128 KiB of Float64, well inside a core's L2.
    private static let sumsBlock = 16384

    /// `‖B̃·Ã‖²_F` from the product, a row `(o, rest…)` at a time (fused multiply-adds, ranks then
    /// columns ascending): for a rank whose r × r Grams would be larger than the product. `b` is B
    /// `[out, r, rest…]` and `a` is A `[r, n]`, decoded; `row` has room for n.
    private static func squaredNormOfProduct(
        b: UnsafePointer<Double>, a: UnsafePointer<Double>, rank: Int, _ bPlan: TensorPlan, _ aPlan: TensorPlan, row: UnsafeMutablePointer<Double>
    ) -> Double {
        let (n, rest) = (aPlan.inner, bPlan.inner)
        var squared = 0.0
        for o in 0..<bPlan.outer {
            for x in 0..<rest {
                row.update(repeating: 0, count: n)
                for j in 0..<rank {
                    let coefficient = b[(o * rank + j) * rest + x]
                    for column in 0..<n { row[column].addProduct(coefficient, a[j * n + column]) }
                }
                for column in 0..<n { squared.addProduct(row[column], row[column]) }
            }
        }
        return squared
    }

    deinit {
        if let sums {
            pool.recycle(sums.a)
            pool.recycle(sums.b)
        }
    }

    /// Writes the means of the module's `factor` tensor at `destination`; false when every norm is 0
    /// (nothing written: the engine aggregates `a` or `b` from the source instead).
    func writeMeans(of factor: LoRAFactor, as dtype: DType, to destination: UnsafeMutableRawPointer, kernels: KernelSet) -> Bool {
        guard let sums else { return false }
        if factor == .a {
            a.writeMeans(of: sums.a, as: dtype, to: destination, kernels: kernels)
        } else {
            b.writeMeans(of: sums.b, as: dtype, to: destination, kernels: kernels)
        }
        return true
    }
}
