/// How the slices of LoRA tensors that only some clients own are averaged (openapi.yaml,
/// "Aggregation semantics"). Slice `j` is row `j` of A or column `j` of B; its owners are the clients with rank > j.
public enum AggregationStrategy: String, Sendable, CaseIterable {
    /// Byun & Lee (arXiv 2406.17477): missing slices are padded with the owners' aggregate, which
    /// equals the owner-weighted mean `Σ_owners w·x / Σ_owners w`.
    case replication
    /// The conventional baseline: missing slices are zeros, so `Σ_owners w·x / Σ_all w`.
    case zeroPadding = "zero_padding"
}

/// What to produce from a round.
public struct AggregationOptions: Sendable {
    public var strategy: AggregationStrategy
    /// The rank of the LoRA tensors in the result, 1...global rank; nil means the global rank.
    public var rank: Int?
    public var dtype: DType
    /// Extra `__metadata__` entries (the engine sets format, strategy, rank and clients itself).
    public var metadata: [String: String]

    public init(strategy: AggregationStrategy = .replication, rank: Int? = nil, dtype: DType = .f32, metadata: [String: String] = [:]) {
        self.strategy = strategy
        self.rank = rank
        self.dtype = dtype
        self.metadata = metadata
    }
}

/// The aggregate: a complete safetensors file.
public struct AggregatedAdapter: Sendable {
    public let bytes: [UInt8]
    /// The rank of the LoRA tensors in `bytes`.
    public let rank: Int
    /// The largest rank in the round.
    public let globalRank: Int
    public let clientCount: Int
}

/// Sees an aggregate's bytes while the engine writes them, in file order: the header, then each
/// tensor as it is finished.
public protocol AggregationOutputObserver: AnyObject {
    /// `bytes` are final and stay valid until `outputComplete()` has returned.
    func regionFinished(_ bytes: UnsafeRawBufferPointer)
    /// Called once, after the last region or when aggregation fails; the observer must be done
    /// with every region when it returns.
    func outputComplete()
}
