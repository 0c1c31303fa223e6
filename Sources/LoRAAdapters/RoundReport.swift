/// What a round's strategies do to each rank slice, for people to look at (openapi.yaml, "Round
/// report"): per LoRA module and slice j, the owners' share of the holders' weight, and the Frobenius
/// norm of the slice's contribution `B[:,j]·A[j,:]` (folded, scale 1) in each strategy's global
/// adapter. Zero padding's dilution shows as contributions shrinking with the owners' share.
public struct RoundReport: Sendable, Equatable {
    public struct Slice: Sendable, Equatable {
        public let index: Int
        /// Holders of the module whose rank for it exceeds the index.
        public let owners: Int
        /// Their weight over the weight of every holder of the module.
        public let ownerShare: Double
        /// `‖B[:,j]‖·‖A[j,:]‖`, the norm of the rank-1 product, by strategy.
        public let contribution: [AggregationStrategy: Double]
    }

    public struct Module: Sendable, Equatable {
        public let name: String
        public let globalRank: Int
        public let holders: Int
        public let slices: [Slice]
    }

    /// Sorted by name.
    public let modules: [Module]

    /// - Parameters:
    ///   - base: the round's base, whose ranks count towards each module's global rank.
    ///   - aggregates: each strategy's global adapter of the round, at scale 1.
    public init(participants: [RoundParticipant], holdings: [TensorHolding], base: [BaseTensor], aggregates: [AggregationStrategy: SafetensorsFile]) {
        let byClient = Dictionary(participants.map { ($0.clientID, $0) }, uniquingKeysWith: { first, _ in first })
        var holdersByModule: [String: Set<String>] = [:]
        for holding in holdings where TensorRole(tensorName: holding.name).factor == .a {
            if let module = TensorRole.moduleName(ofTensor: holding.name) { holdersByModule[module, default: []].insert(holding.clientID) }
        }
        let factorsByModule = aggregates.mapValues { Self.sliceNorms(of: $0) }
        let ranks = ModuleRanks(participants: participants, base: base)
        modules = Set(holdersByModule.keys).union(ranks.baseModules).sorted().map { module in
            let holders = (holdersByModule[module] ?? []).compactMap { byClient[$0] }
            let totalWeight = holders.reduce(0) { $0 + $1.weight }
            let globalRank = ranks.globalRank(ofModule: module)
            let slices = (0..<globalRank).map { j in
                let owners = holders.filter { $0.config.rank(ofModule: module) > j }
                return Slice(
                    index: j, owners: owners.count, ownerShare: totalWeight > 0 ? owners.reduce(0) { $0 + $1.weight } / totalWeight : 0,
                    contribution: factorsByModule.compactMapValues { norms in norms[module].map { j < $0.count ? $0[j] : 0 } })
            }
            return Module(name: module, globalRank: globalRank, holders: holders.count, slices: slices)
        }
    }

    /// Per module of `file`, `‖B[:,j]‖·‖A[j,:]‖` for each slice j (further axes ride along).
    static func sliceNorms(of file: SafetensorsFile) -> [String: [Double]] {
        var rows: [String: [Double]] = [:]
        var columns: [String: [Double]] = [:]
        for tensor in file.tensors {
            let role = TensorRole(tensorName: tensor.name)
            guard let factor = role.factor, let module = TensorRole.moduleName(ofTensor: tensor.name), let rank = role.rank(of: tensor.shape) else { continue }
            let values = file.values(of: tensor)
            var squares = [Double](repeating: 0, count: rank)
            // A [r, …]: slice j is the j-th block of the rest; B [out, r, …]: the j-th run in each block of r runs.
            let run = tensor.shape.dropFirst(factor == .a ? 1 : 2).reduce(1, *)
            for (index, value) in values.enumerated() { squares[(index / run) % rank] += value * value }
            if factor == .a { rows[module] = squares } else { columns[module] = squares }
        }
        return Dictionary(uniqueKeysWithValues: rows.compactMap { module, a in columns[module].map { (module, zip(a, $0).map { ($0 * $1).squareRoot() }) } })
    }
}
