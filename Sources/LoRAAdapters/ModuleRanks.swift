/// Each LoRA module's global rank in a round (openapi.yaml, aggregation semantics, step 2): the
/// largest rank any upload's config gives it, whether or not that upload holds the module, and the
/// base's rank for it.
public struct ModuleRanks: Sendable {
    private let configs: [AdapterConfig]
    /// The base's rank of each module it holds.
    public let baseRanks: [String: Int]

    public init(configs: [AdapterConfig], baseRanks: [String: Int]) {
        self.configs = configs
        self.baseRanks = baseRanks
    }

    public init(participants: [RoundParticipant], base: [BaseTensor]) {
        self.init(configs: participants.map(\.config), baseRanks: Self.ranks(of: base))
    }

    /// The rank of each module among `tensors` (read from its A or B factor's shape).
    public static func ranks(of tensors: [BaseTensor]) -> [String: Int] {
        var ranks: [String: Int] = [:]
        for tensor in tensors {
            let role = TensorRole(tensorName: tensor.name)
            guard role.factor != nil, let module = TensorRole.moduleName(ofTensor: tensor.name), let rank = role.rank(of: tensor.shape) else { continue }
            ranks[module] = max(ranks[module] ?? 0, rank)
        }
        return ranks
    }

    public var baseModules: Set<String> { Set(baseRanks.keys) }

    public func globalRank(ofModule module: String) -> Int {
        max(configs.lazy.map { $0.rank(ofModule: module) }.max() ?? 0, baseRanks[module] ?? 0)
    }
}
