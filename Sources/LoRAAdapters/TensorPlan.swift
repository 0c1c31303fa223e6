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
    }

    let name: String
    let holders: [Holder]
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
    let denominators: [Double]
    /// The round's base's tensor of this name, if it has one.
    let base: BaseTensor?
    /// The base's rank for this tensor (1 for a dense tensor).
    let baseRank: Int
    /// The output slices the base gives: under replication, those no upload owns; a dense tensor
    /// that no upload holds, under every strategy.
    let baseSlices: Range<Int>

    let isLoRA: Bool
    /// The LoRA module and factor of the tensor; nil for a dense tensor.
    let module: String?
    let factor: LoRAFactor?

    /// - Parameters:
    ///   - rankLimit: the largest output rank (nil for a client's own ranks, from `scaling`).
    ///   - loraWeights: per module, each client's weight for its LoRA tensors instead of its upload
    ///     weight (HetLoRA's norms).
    static func plans(
        for holdings: [TensorHolding], base: [BaseTensor], participants: [String: RoundParticipant], ranks: ModuleRanks, rankLimit: Int?,
        scaling: TargetScaling, strategy: AggregationStrategy, loraWeights: [String: [String: Double]] = [:]
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
                    strategy: strategy, loraWeights: TensorRole.moduleName(ofTensor: name).flatMap { loraWeights[$0] }))
        }
        return plans
    }

    private init(
        name: String, holdings: [TensorHolding], base: BaseTensor?, participants: [String: RoundParticipant], ranks: ModuleRanks, rankLimit: Int?,
        scaling: TargetScaling, strategy: AggregationStrategy, loraWeights: [String: Double]?
    ) throws(AdapterError) {
        let role = TensorRole(tensorName: name)
        let module = role.factor != nil ? TensorRole.moduleName(ofTensor: name) : nil
        // Every plan has an upload or the base holding its tensor.
        let referenceShape = holdings.first?.shape ?? base!.shape
        if let base { try RoundShapeCheck.check(name: name, shape: base.shape, against: referenceShape) }
        var holders: [Holder] = []
        for (index, holding) in holdings.enumerated() {
            guard let participant = participants[holding.clientID] else {
                throw AdapterError(.inconsistentSource, "client '\(holding.clientID)' holds the tensor but has no upload in the round", tensor: name)
            }
            if index > 0, holdings[index - 1].clientID == holding.clientID {
                throw AdapterError(.inconsistentSource, "client '\(holding.clientID)' holds the tensor twice", tensor: name)
            }
            try RoundShapeCheck.check(name: name, shape: holding.shape, against: referenceShape)
            let clientRank: Int
            var weight = participant.weight
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
                // HetLoRA's norms replace the weights, unless every one is 0.
                if let loraWeights, loraWeights.values.contains(where: { $0 > 0 }) { weight = loraWeights[holding.clientID] ?? 0 }
            } else {
                clientRank = 1
            }
            let root = module.map { participant.config.scale(ofModule: $0).squareRoot() } ?? 1
            holders.append(
                Holder(clientID: holding.clientID, dtype: holding.dtype, shape: holding.shape, rank: clientRank, weight: weight, foldedWeight: weight * root))
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
        let totalWeight = holders.reduce(0) { $0 + $1.weight }
        denominators = (0..<outputRank).map { [baseSlices, isLoRA] slice in
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

    /// Adds `weight ·` the given output `slices` of one tensor of rank `clientRank` (a client's, or
    /// the base's) to `sums`.
    func add(
        _ source: UnsafeRawPointer, dtype: DType, clientRank: Int, slices: Range<Int>, weight: Double, into sums: UnsafeMutableBufferPointer<Double>
    ) {
        switch dtype {
        case .f32: add(source, as: F32Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums)
        case .f16: add(source, as: F16Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums)
        case .bf16: add(source, as: BF16Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums)
        case .f64: add(source, as: F64Codec.self, clientRank: clientRank, slices: slices, weight: weight, into: sums)
        }
    }

    private func add<Codec: ElementCodec>(
        _ source: UnsafeRawPointer, as _: Codec.Type, clientRank: Int, slices: Range<Int>, weight: Double, into sums: UnsafeMutableBufferPointer<Double>
    ) {
        let runLength = slices.count * inner
        guard runLength > 0 else { return }
        let sourceBlockBytes = clientRank * inner * Codec.dtype.byteWidth
        let destinationBlock = outputRank * inner
        if clientRank == outputRank && slices == 0..<outputRank {
            // Same rank on both sides: the blocks are back to back in both, so it is one long run.
            addRun(from: source, as: Codec.self, weight: weight, into: sums.baseAddress!, count: outer * runLength)
            return
        }
        let sourceStart = source + slices.lowerBound &* inner &* Codec.dtype.byteWidth
        let destinationStart = sums.baseAddress! + slices.lowerBound &* inner
        for block in 0..<outer {
            addRun(
                from: sourceStart + block &* sourceBlockBytes, as: Codec.self, weight: weight,
                into: destinationStart + block &* destinationBlock, count: runLength)
        }
    }

    /// `destination[i] += weight · source[i]` over one contiguous run; written with wrapping index
    /// arithmetic and plain pointers so that the compiler vectorises it.
    @inline(__always)
    private func addRun<Codec: ElementCodec>(
        from source: UnsafeRawPointer, as _: Codec.Type, weight: Double, into destination: UnsafeMutablePointer<Double>, count: Int
    ) {
        var index = 0
        while index < count {
            destination[index] += weight * Codec.load(source, at: index)
            index &+= 1
        }
    }

    /// Writes `sums` divided slice by slice by the denominators, rounded to `dtype`, at `destination`.
    /// Unowned slices hold exact zeros and are divided by +∞, which keeps them 0 without a branch.
    func writeMeans(of sums: UnsafeMutableBufferPointer<Double>, as dtype: DType, to destination: UnsafeMutableRawPointer) {
        switch dtype {
        case .f32: writeMeans(of: sums, as: F32Codec.self, to: destination)
        case .f16: writeMeans(of: sums, as: F16Codec.self, to: destination)
        case .bf16: writeMeans(of: sums, as: BF16Codec.self, to: destination)
        case .f64: writeMeans(of: sums, as: F64Codec.self, to: destination)
        }
    }

    private func writeMeans<Codec: ElementCodec>(of sums: UnsafeMutableBufferPointer<Double>, as _: Codec.Type, to destination: UnsafeMutableRawPointer) {
        let base = sums.baseAddress!
        denominators.withUnsafeBufferPointer { denominators in
            let divisors = denominators.baseAddress!
            for block in 0..<outer {
                let blockOffset = block &* outputRank &* inner
                let blockSums = base + blockOffset
                let blockDestination = destination + blockOffset &* Codec.dtype.byteWidth
                if inner == 1 {
                    // B tensors: one element per slice, so each block is divided by the divisor vector.
                    for slice in 0..<outputRank {
                        Codec.store(blockSums[slice] / divisors[slice], to: blockDestination, at: slice)
                    }
                } else {
                    for slice in 0..<outputRank {
                        let runStart = slice &* inner
                        let divisor = divisors[slice]
                        for index in runStart..<(runStart &+ inner) {
                            Codec.store(blockSums[index] / divisor, to: blockDestination, at: index)
                        }
                    }
                }
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
            guard next < holders.count, holders[next].clientID == contribution.clientID else {
                throw AdapterError(
                    .inconsistentSource, "the source delivered client '\(contribution.clientID)' out of client-id order or unannounced", tensor: name)
            }
            let holder = holders[next]
            guard contribution.dtype == holder.dtype, contribution.shape == holder.shape,
                contribution.bytes.count == holder.shape.reduce(1, *) * holder.dtype.byteWidth
            else {
                throw AdapterError(
                    .inconsistentSource, "client '\(holder.clientID)' delivered bytes that disagree with its announced dtype and shape", tensor: name)
            }
            try body(next, holder, contribution.bytes)
            next += 1
        }
        guard next == holders.count else {
            throw AdapterError(.inconsistentSource, "the source delivered \(next) of \(holders.count) announced clients", tensor: name)
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
