/// How one tensor name of a round is aggregated: its holders in client-id order, the output shape,
/// and the per-slice denominators of the strategy.
///
/// Every tensor is viewed as `[outer, rank, inner]`: A `[r, in, ...]` is `[1, r, in·...]`, B
/// `[out, r, ...]` is `[out, r, ...]`, and a dense tensor is `[1, 1, all elements]`. Slice `j` of
/// the rank axis is then `inner` contiguous elements in each of the `outer` blocks.
struct TensorPlan {
    struct Holder {
        let clientID: String
        let dtype: DType
        let shape: [Int]
        /// This client's rank for the tensor (1 for dense tensors).
        let rank: Int
        let weight: Double
        /// What the client's values are multiplied by when summed: `w·√s` for a LoRA factor (folding
        /// the client's scale into it), `w` for a dense tensor. With `s = 1` this is `w` exactly.
        let foldedWeight: Double
        /// `√s` for a LoRA factor, 1 for a dense tensor.
        let foldingRoot: Double

        init(clientID: String, dtype: DType, shape: [Int], rank: Int, weight: Double, foldingRoot: Double) {
            self.clientID = clientID
            self.dtype = dtype
            self.shape = shape
            self.rank = rank
            self.weight = weight
            self.foldingRoot = foldingRoot
            foldedWeight = weight * foldingRoot
        }

        func reweighted(_ weight: Double) -> Holder {
            Holder(clientID: clientID, dtype: dtype, shape: shape, rank: rank, weight: weight, foldingRoot: foldingRoot)
        }
    }

    let name: String
    private(set) var holders: [Holder]
    let outputShape: [Int]
    let outputElementCount: Int
    let outer: Int
    let inner: Int
    /// The rank of the output (1 for dense tensors).
    let outputRank: Int
    /// Divisor of each output rank slice: the strategy's weight sum times `√s_t`, which unfolds the
    /// mean to the target scale in the same single division (times 1 at scale 1, so those bytes are
    /// unchanged); `√s_t` alone for a slice taken from the base; +∞ where neither an upload nor the
    /// base gives the slice (it stays 0).
    private(set) var denominators: [Double]
    /// The round's base's tensor of this name, if it has one.
    let base: BaseTensor?
    /// The base's rank for this tensor (1 for a dense tensor).
    let baseRank: Int
    /// The output slices the base gives: under replication, those no upload owns; a dense tensor
    /// that no upload holds, under every strategy.
    let baseSlices: Range<Int>
    /// Whether the output takes slices from the base, so its tensor is read too.
    var readsBase: Bool { base != nil && !baseSlices.isEmpty }

    let isLoRA: Bool
    /// The LoRA module and factor of the tensor; nil for a dense tensor.
    let module: String?
    let factor: LoRAFactor?
    private let strategy: AggregationStrategy
    /// `√s_t`: divides the mean to unfold it to the target scale.
    private let unfoldingDivisor: Double

    /// - Parameter rankLimit: the largest output rank (nil for a client's own ranks, from `scaling`).
    static func plans(
        for holdings: [TensorHolding], base: [BaseTensor], participants: [String: RoundParticipant], ranks: ModuleRanks, rankLimit: Int?,
        scaling: TargetScaling, strategy: AggregationStrategy
    ) throws(AdapterError) -> [TensorPlan] {
        let byName = Dictionary(grouping: holdings, by: \.name)
        let baseByName = Dictionary(base.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let names = Set(byName.keys).union(baseByName.keys)
        var plans: [TensorPlan] = []
        plans.reserveCapacity(names.count)
        for name in names.sorted() {
            let group = (byName[name] ?? []).sorted { $0.clientID < $1.clientID }
            plans.append(
                try TensorPlan(
                    name: name, holdings: group, base: baseByName[name], participants: participants, ranks: ranks, rankLimit: rankLimit, scaling: scaling,
                    strategy: strategy))
        }
        return plans
    }

    private init(
        name: String, holdings: [TensorHolding], base: BaseTensor?, participants: [String: RoundParticipant], ranks: ModuleRanks, rankLimit: Int?,
        scaling: TargetScaling, strategy: AggregationStrategy
    ) throws(AdapterError) {
        let role = TensorRole(tensorName: name)
        let module = role.factor != nil ? TensorRole.moduleName(ofTensor: name) : nil
        // Every plan has an upload or the base holding its tensor.
        let referenceShape = holdings.first?.shape ?? base!.shape
        if let base { try RoundShapeCheck.check(name: name, shape: base.shape, against: referenceShape, role: role) }
        var holders: [Holder] = []
        for (index, holding) in holdings.enumerated() {
            guard let participant = participants[holding.clientID] else {
                throw AdapterError(.inconsistentSource, "client '\(holding.clientID)' holds the tensor but has no upload in the round", tensor: name)
            }
            if index > 0, holdings[index - 1].clientID == holding.clientID {
                throw AdapterError(.inconsistentSource, "client '\(holding.clientID)' holds the tensor twice", tensor: name)
            }
            try RoundShapeCheck.check(name: name, shape: holding.shape, against: referenceShape, role: role)
            let clientRank: Int
            if let module {
                guard let tensorRank = role.rank(of: holding.shape), tensorRank >= 1 else {
                    throw AdapterError(.invalidRank, "client '\(holding.clientID)' has shape \(holding.shape), with no positive rank axis", tensor: name)
                }
                guard tensorRank == participant.config.rank(ofModule: module) else {
                    throw AdapterError(
                        .inconsistentSource,
                        "client '\(holding.clientID)' has rank \(tensorRank) here but \(participant.config.rank(ofModule: module)) in its config", tensor: name)
                }
                clientRank = tensorRank
            } else {
                clientRank = 1
            }
            let root = module.map { participant.config.scale(ofModule: $0).squareRoot() } ?? 1
            holders.append(
                Holder(clientID: holding.clientID, dtype: holding.dtype, shape: holding.shape, rank: clientRank, weight: participant.weight, foldingRoot: root))
        }
        var rank = 1
        var unfoldingDivisor = 1.0
        if let module {
            let moduleGlobalRank = ranks.globalRank(ofModule: module)
            rank = min(rankLimit ?? moduleGlobalRank, moduleGlobalRank)
            switch scaling {
            case .unit:
                break
            case .uniform(let loraAlpha, let useRSLoRA):
                unfoldingDivisor = AdapterConfig.scale(alpha: loraAlpha, rank: rank, useRSLoRA: useRSLoRA).squareRoot()
            case .client(let config):
                rank = min(config.rank(ofModule: module), moduleGlobalRank)
                unfoldingDivisor = AdapterConfig.scale(alpha: config.alpha(ofModule: module), rank: rank, useRSLoRA: config.useRSLoRA).squareRoot()
            }
        }

        self.name = name
        self.holders = holders
        self.strategy = strategy
        self.unfoldingDivisor = unfoldingDivisor
        isLoRA = module != nil
        self.module = module
        factor = role.factor
        switch role.factor {
        case .a:
            outer = 1
            inner = referenceShape.dropFirst().reduce(1, *)
            outputRank = rank
        case .b:
            outer = referenceShape[0]
            inner = referenceShape.dropFirst(2).reduce(1, *)
            outputRank = rank
        case nil:
            outer = 1
            inner = referenceShape.reduce(1, *)
            outputRank = 1
        }
        outputShape = role.shape(referenceShape, withRank: rank)
        outputElementCount = outer * outputRank * inner

        self.base = base
        baseRank = base.map { module != nil ? role.rank(of: $0.shape) ?? 0 : 1 } ?? 0
        // Slice j is owned when some holder's rank exceeds j, so the unowned slices are a suffix.
        let ownedRank = holders.map(\.rank).max() ?? 0
        let baseFills = base != nil && (module == nil || strategy == .replication)
        baseSlices = baseFills ? ownedRank..<max(ownedRank, min(baseRank, outputRank)) : 0..<0
        denominators = []
        denominators = slicesDenominators()
    }

    private func slicesDenominators() -> [Double] {
        let totalWeight = holders.reduce(0) { $0 + $1.weight }
        return (0..<outputRank).map { slice in
            if baseSlices.contains(slice) { return unfoldingDivisor }
            let weight =
                switch strategy {
                case .zeroPadding, .hetlora: totalWeight
                case .replication: holders.reduce(0) { $1.rank > slice ? $0 + $1.weight : $0 }
                // The factors are computed whole (LowRankFactors); the plan only unfolds them.
                case .svd: isLoRA ? 1 : totalWeight
                }
            return weight > 0 ? weight * unfoldingDivisor : .infinity
        }
    }

    /// The plan with each holder's upload weight replaced by `weights[clientID]` (0 when absent),
    /// unless every one is 0: HetLoRA's norms.
    func reweighted(_ weights: [String: Double]) -> TensorPlan {
        guard weights.values.contains(where: { $0 > 0 }) else { return self }
        var plan = self
        plan.holders = holders.map { $0.reweighted(weights[$0.clientID] ?? 0) }
        plan.denominators = plan.slicesDenominators()
        return plan
    }

    /// Adds `weight ·` the given output `slices` of one tensor of rank `clientRank` (a client's, or
    /// the base's) to `sums`, for the output elements in `range` only (all by default). `source`
    /// holds the tensor's elements from `sourceOffset` on (a part of it, say).
    func add(
        _ source: UnsafeRawPointer, sourceOffset: Int = 0, dtype: DType, clientRank: Int, slices: Range<Int>, weight: Double,
        into sums: UnsafeMutableBufferPointer<Double>, kernels: KernelSet = .portable, range: Range<Int>? = nil
    ) {
        let range = range ?? 0..<outputElementCount
        switch (dtype, kernels) {
        case (.f32, .portable): add(source, sourceOffset, as: F32Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.f16, .portable): add(source, sourceOffset, as: F16Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.bf16, .portable): add(source, sourceOffset, as: BF16Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.f64, .portable): add(source, sourceOffset, as: F64Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.f32, .avx2):
            add(source, sourceOffset, as: F32Codec.Vectorised.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.f16, .avx2):
            add(source, sourceOffset, as: F16Codec.Vectorised.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.bf16, .avx2):
            add(source, sourceOffset, as: BF16Codec.Vectorised.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        case (.f64, .avx2):
            add(source, sourceOffset, as: F64Codec.Vectorised.self, clientRank: clientRank, slices: slices, weight: weight, into: sums, range: range)
        }
    }

    private func add<Kernel: RunKernel>(
        _ source: UnsafeRawPointer, _ sourceOffset: Int, as _: Kernel.Type, clientRank: Int, slices: Range<Int>, weight: Double,
        into sums: UnsafeMutableBufferPointer<Double>, range: Range<Int>
    ) {
        let width = Kernel.dtype.byteWidth
        let sums = sums.baseAddress!
        let (sourceStride, outputStride) = (clientRank &* inner, outputRank &* inner)
        forEachRunBatch(clientRank: clientRank, slices: slices, in: range) { sourceElement, outputElement, length, rows in
            Kernel.accumulate(
                source + (sourceElement &- sourceOffset) &* width, stride: sourceStride, weight: weight, into: sums + outputElement, stride: outputStride,
                length: length, rows: rows)
        }
    }

    /// The contiguous runs in which a tensor of rank `clientRank` gives the output elements of
    /// `slices` within `range`: (its first element, the output's first element, length), both
    /// increasing. Block b holds a run at output elements b·outputRank·inner + slices.lowerBound·inner
    /// onwards and at source elements b·clientRank·inner + slices.lowerBound·inner onwards.
    @inline(__always)
    func forEachRun(clientRank: Int, slices: Range<Int>, in range: Range<Int>, _ body: (Int, Int, Int) throws -> Void) rethrows {
        try forEachRunBatch(clientRank: clientRank, slices: slices, in: range) { sourceElement, outputElement, length, rows in
            for row in 0..<rows { try body(sourceElement &+ row &* clientRank &* inner, outputElement &+ row &* outputRank &* inner, length) }
        }
    }

    /// The runs of `forEachRun`, consecutive whole ones together: (the first run's source element,
    /// its output element, the run length, the number of runs), runs `clientRank·inner` source and
    /// `outputRank·inner` output elements apart. A B tensor's rows of its rank then go to the kernel
    /// in one call, not one call per row.
    @inline(__always)
    func forEachRunBatch(clientRank: Int, slices: Range<Int>, in range: Range<Int>, _ body: (Int, Int, Int, Int) throws -> Void) rethrows {
        guard !slices.isEmpty, !range.isEmpty else { return }
        if clientRank == outputRank && slices == 0..<outputRank {
            // Same rank on both sides: the blocks are back to back in both, so it is one long run.
            return try body(range.lowerBound, range.lowerBound, range.count, 1)
        }
        let blockLength = outputRank &* inner
        let runOffset = slices.lowerBound &* inner
        let runLength = slices.count &* inner
        var block = range.lowerBound / blockLength
        let endBlock = min(outer, (range.upperBound &+ blockLength &- 1) / blockLength)
        while block < endBlock {
            let runStart = block &* blockLength &+ runOffset
            let start = max(runStart, range.lowerBound)
            let end = min(runStart &+ runLength, range.upperBound)
            if start >= end {
                block &+= 1
            } else if start == runStart && end == runStart &+ runLength {
                // Whole runs from this block to the last block whose run ends inside the range.
                let lastWhole = min(endBlock &- 1, (range.upperBound &- runOffset &- runLength) / blockLength)
                try body(block &* clientRank &* inner &+ runOffset, runStart, runLength, lastWhole &- block &+ 1)
                block = lastWhole &+ 1
            } else {
                try body(block &* clientRank &* inner &+ runOffset &+ (start &- runStart), start, end &- start, 1)
                block &+= 1
            }
        }
    }

    /// Calls `body` with each span of a rank-`clientRank` tensor's elements that the output elements
    /// in `range` need, each at most `maxElements` long, and the output elements the span gives. A
    /// holder of a higher rank than the output's gives every `clientRank`-th stretch only, so its
    /// span can be far longer than the output range: it is cut into several.
    @inline(__always)
    func forEachSourceSpan(
        clientRank: Int, slices: Range<Int>, in range: Range<Int>, maxElements: Int, _ body: (_ source: Range<Int>, _ output: Range<Int>) throws -> Void
    ) rethrows {
        var span: (source: Range<Int>, output: Range<Int>)?
        try forEachRun(clientRank: clientRank, slices: slices, in: range) { sourceElement, outputElement, count in
            if let current = span, sourceElement &+ count &- current.source.lowerBound <= maxElements {
                span = (current.source.lowerBound..<(sourceElement &+ count), current.output.lowerBound..<(outputElement &+ count))
            } else {
                if let current = span { try body(current.source, current.output) }
                span = (sourceElement..<(sourceElement &+ count), outputElement..<(outputElement &+ count))
            }
        }
        if let span { try body(span.source, span.output) }
    }

    /// Writes `sums` divided slice by slice by the denominators, rounded to `dtype`, at `destination`
    /// (the tensor's first byte), for the output elements in `range` only (all by default).
    /// Unowned slices hold exact zeros and are divided by +∞, which keeps them 0 without a branch.
    func writeMeans(
        of sums: UnsafeMutableBufferPointer<Double>, as dtype: DType, to destination: UnsafeMutableRawPointer, kernels: KernelSet = .portable,
        range: Range<Int>? = nil
    ) {
        let range = range ?? 0..<outputElementCount
        switch (dtype, kernels) {
        case (.f32, .portable): writeMeans(of: sums, as: F32Codec.self, to: destination, range: range)
        case (.f16, .portable): writeMeans(of: sums, as: F16Codec.self, to: destination, range: range)
        case (.bf16, .portable): writeMeans(of: sums, as: BF16Codec.self, to: destination, range: range)
        case (.f64, .portable): writeMeans(of: sums, as: F64Codec.self, to: destination, range: range)
        case (.f32, .avx2): writeMeans(of: sums, as: F32Codec.Vectorised.self, to: destination, range: range)
        case (.f16, .avx2): writeMeans(of: sums, as: F16Codec.Vectorised.self, to: destination, range: range)
        case (.bf16, .avx2): writeMeans(of: sums, as: BF16Codec.Vectorised.self, to: destination, range: range)
        case (.f64, .avx2): writeMeans(of: sums, as: F64Codec.Vectorised.self, to: destination, range: range)
        }
    }

    private func writeMeans<Kernel: RunKernel>(
        of sums: UnsafeMutableBufferPointer<Double>, as _: Kernel.Type, to destination: UnsafeMutableRawPointer, range: Range<Int>
    ) {
        guard !range.isEmpty else { return }
        let base = sums.baseAddress!
        let width = Kernel.dtype.byteWidth
        denominators.withUnsafeBufferPointer { denominators in
            let divisors = denominators.baseAddress!
            if inner == 1 {
                // B tensors: one element per slice, so the divisors repeat every outputRank elements:
                // the part rows at either end of the range, and the whole rows between in one call.
                func divide(from start: Int, length: Int, rows: Int) {
                    guard length > 0, rows > 0 else { return }
                    Kernel.divide(base + start, by: divisors + start % outputRank, into: destination + start &* width, length: length, rows: rows)
                }
                let wholeStart = min(range.upperBound, (range.lowerBound &+ outputRank &- 1) / outputRank &* outputRank)
                let rows = (range.upperBound &- wholeStart) / outputRank
                let wholeEnd = wholeStart &+ rows &* outputRank
                divide(from: range.lowerBound, length: wholeStart &- range.lowerBound, rows: 1)
                divide(from: wholeStart, length: outputRank, rows: rows)
                divide(from: wholeEnd, length: range.upperBound &- wholeEnd, rows: 1)
                return
            }
            // Runs of `inner` elements share a divisor: slice (index / inner) % outputRank.
            var start = range.lowerBound
            while start < range.upperBound {
                let end = min((start / inner &+ 1) &* inner, range.upperBound)
                let divisor = divisors[(start / inner) % outputRank]
                Kernel.divide(base + start, by: divisor, into: destination + start &* width, count: end &- start)
                start = end
            }
        }
    }
}

extension TensorPlan {
    /// Calls `body` with each holder's index, the holder, and its bytes of the tensor, checking that
    /// the source delivers exactly the announced holders, in client-id order, with the announced
    /// dtypes, shapes and sizes.
    func forEachHolder(in source: some AdapterSource, _ body: (Int, Holder, UnsafeRawBufferPointer) throws -> Void) throws {
        var next = 0
        try source.forEachContribution(toTensor: name) { contribution in
            try body(next, try holder(at: next, delivering: contribution), contribution.bytes)
            next += 1
        }
        try checkAllDelivered(next)
    }

    /// The holders, from what a contribution reader announces, checked as `forEachHolder` checks them.
    func checkedHolders(_ contributions: [ContributionInfo]) throws(AdapterError) -> [Holder] {
        let checked = try contributions.enumerated().map { index, contribution throws(AdapterError) in try holder(at: index, delivering: contribution) }
        try checkAllDelivered(contributions.count)
        return checked
    }

    private func holder(at index: Int, delivering contribution: TensorContribution) throws(AdapterError) -> Holder {
        try holder(at: index, delivering: contribution.info)
    }

    private func holder(at index: Int, delivering contribution: ContributionInfo) throws(AdapterError) -> Holder {
        guard index < holders.count, holders[index].clientID == contribution.clientID else {
            throw AdapterError(
                .inconsistentSource, "the source delivered client '\(contribution.clientID)' out of client-id order or unannounced", tensor: name)
        }
        let holder = holders[index]
        guard contribution.dtype == holder.dtype, contribution.shape == holder.shape,
            contribution.byteCount == holder.shape.reduce(1, *) * holder.dtype.byteWidth
        else {
            throw AdapterError(
                .inconsistentSource, "client '\(holder.clientID)' delivered bytes that disagree with its announced dtype and shape", tensor: name)
        }
        return holder
    }

    private func checkAllDelivered(_ count: Int) throws(AdapterError) {
        guard count == holders.count else {
            throw AdapterError(.inconsistentSource, "the source delivered \(count) of \(holders.count) announced clients", tensor: name)
        }
    }

    /// A module's A and B plans must have the same holders at the same ranks.
    static func checkPaired(_ a: TensorPlan, _ b: TensorPlan) throws(AdapterError) {
        guard a.holders.map(\.clientID) == b.holders.map(\.clientID), zip(a.holders, b.holders).allSatisfy({ $0.rank == $1.rank }) else {
            throw AdapterError(.inconsistentSource, "the module's A and B tensors have different holders or ranks", tensor: a.name)
        }
    }

    /// A B tensor `[out, r, rest…]` of rank `rank` (row-major, at `values`) as the columns of a
    /// column-major `out·rest × r` matrix at `destination`: row (o, rest), column j.
    func gatherColumns(_ values: UnsafePointer<Double>, rank: Int, into destination: UnsafeMutablePointer<Double>) {
        let (rest, rows) = (inner, outer * inner)
        for o in 0..<outer {
            for j in 0..<rank {
                for x in 0..<rest { destination[j * rows + o * rest + x] = values[(o * rank + j) * rest + x] }
            }
        }
    }
}
