/// The hetlora strategy for one LoRA module (Cho et al. 2024; openapi.yaml, `hetlora`): zero padding
/// with each holder's weight replaced by the norm of its folded update `‖B̃·Ã‖_F`, from the r × r
/// Gram matrices (`‖B̃Ã‖²_F = trace((B̃ᵀB̃)(ÃÃᵀ))`), never the dense product.
///
/// The module's factors are read and decoded once, on the engine's thread; a worker then takes the
/// holders in client-id order, computes each one's norm and adds its weighted factors to the sums
/// while they are still in cache. The sums are the engine's (the same products added in the same
/// order), so the bytes equal a norm pass followed by the engine's zero padding.
final class NormWeightedModule: @unchecked Sendable {
    // @unchecked: built on a worker and only read after it is handed over.

    /// The module's plans with the norms as weights (the upload weights when every norm is 0).
    let a: TensorPlan
    let b: TensorPlan
    /// `Σ w·x̃` of each plan; nil when every norm is 0: the engine then aggregates the plans from
    /// the source as it does for zero padding.
    private let sums: (a: UnsafeMutableBufferPointer<Double>, b: UnsafeMutableBufferPointer<Double>)?
    private let pool: BufferPool

    /// The module's A and B factors of every holder, decoded to Float64 as they are laid out.
    final class Decoded: @unchecked Sendable {
        // @unchecked: filled on the engine's thread, then handed to one worker.
        let a: TensorPlan
        let b: TensorPlan
        /// Each holder's A `[r, n]` then its B `[out, r, rest…]`, back to back.
        let values: UnsafeMutableBufferPointer<Double>
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
            for holder in a.holders {
                let aRegion = end..<(end + holder.rank * a.inner)
                regions.append((aRegion, aRegion.upperBound..<(aRegion.upperBound + b.outer * holder.rank * b.inner)))
                end = regions.last!.b.upperBound
            }
            self.regions = regions
            // Every element is written below: each holder's regions are exactly its tensors.
            let values = pool.take(end)
            self.values = values
            for (plan, isA) in [(a, true), (b, false)] {
                try plan.forEachHolder(in: source) { index, holder, bytes in
                    guard let origin = bytes.baseAddress else { return }  // an empty tensor
                    let destination = isA ? regions[index].a : regions[index].b
                    holder.dtype.decode(origin, count: destination.count, times: 1, into: values.baseAddress! + destination.lowerBound)
                }
            }
        }

        deinit { pool.recycle(values) }
    }

    /// Computes the norms and the weighted sums (on a worker: pure computation).
    init(_ decoded: Decoded, kernels: KernelSet) {
        let (a, b) = (decoded.a, decoded.b)
        pool = decoded.pool
        // Pooled buffers are kept whole (they go back whole); only their first elements are the sums.
        let (sumsA, sumsB) = (pool.take(a.outputElementCount), pool.take(b.outputElementCount))
        UnsafeMutableBufferPointer(rebasing: sumsA[0..<a.outputElementCount]).update(repeating: 0)
        UnsafeMutableBufferPointer(rebasing: sumsB[0..<b.outputElementCount]).update(repeating: 0)
        let rows = b.outer * b.inner
        // A conv B `[out, r, rest…]` is gathered into the columns of an `out·rest × r` matrix for its Gram.
        var gathered = [Double](repeating: 0, count: b.inner > 1 ? (a.holders.map(\.rank).max() ?? 0) * rows : 0)
        var norms: [String: Double] = [:]
        let values = decoded.values
        for (index, holder) in a.holders.enumerated() {
            let (aValues, bValues) = (values.baseAddress! + decoded.regions[index].a.lowerBound, values.baseAddress! + decoded.regions[index].b.lowerBound)
            var squared = 0.0
            if holder.rank > 0, !decoded.regions[index].a.isEmpty {
                // A `[r, n]` row-major is the column-major n × r matrix whose Gram of columns is
                // ÃÃᵀ; B `[out, r]` row-major is the column-major r × out matrix whose Gram of rows is B̃ᵀB̃.
                let gramA = LinearAlgebra.gram(aValues, rows: a.inner, columns: holder.rank, ofColumns: true)
                let gramB =
                    b.inner > 1
                    ? gathered.withUnsafeMutableBufferPointer { gathered in
                        b.gatherColumns(bValues, rank: holder.rank, into: gathered.baseAddress!)
                        return LinearAlgebra.gram(gathered.baseAddress!, rows: rows, columns: holder.rank, ofColumns: true)
                    }
                    : LinearAlgebra.gram(bValues, rows: holder.rank, columns: rows, ofColumns: false)
                // trace(G_B·G_A) of two symmetric matrices from their upper triangles.
                for j in 0..<holder.rank {
                    for i in 0...j { squared += (i == j ? 1 : 2) * gramA[i + j * holder.rank] * gramB[i + j * holder.rank] }
                }
            }
            // The norm of the folded update: both factors carry √s. Written as the first version
            // computed it (not foldingRoot²), which can differ in the last bit: the bytes stay those.
            let scale = (holder.foldedWeight / holder.weight) * (holder.foldedWeight / holder.weight)
            let norm = scale * max(0, squared).squareRoot()
            norms[holder.clientID] = norm
            // The weight `reweighted` gives this holder unless every norm is 0 (then the sums are dropped).
            let weight = holder.reweighted(norm).foldedWeight
            a.add(aValues, dtype: .f64, clientRank: holder.rank, slices: 0..<min(holder.rank, a.outputRank), weight: weight, into: sumsA, kernels: kernels)
            b.add(bValues, dtype: .f64, clientRank: holder.rank, slices: 0..<min(holder.rank, b.outputRank), weight: weight, into: sumsB, kernels: kernels)
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
