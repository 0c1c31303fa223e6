/// How the slices of LoRA tensors that only some clients own are averaged (openapi.yaml, "Aggregation
/// semantics"). Slice `j` is row `j` of A or column `j` of B; its owners are the clients with rank > j.
public enum AggregationStrategy: String, Sendable, CaseIterable, Codable {
    /// Byun & Lee (arXiv 2406.17477): missing slices are padded with the owners' aggregate, which
    /// equals the owner-weighted mean `Σ_owners w·x / Σ_owners w`.
    case replication
    /// The conventional baseline: missing slices are zeros, so `Σ_owners w·x / Σ_all w`.
    case zeroPadding = "zero_padding"
    /// HetLoRA (Cho et al. 2024): zero padding with each upload's weight replaced, per module, by the
    /// Frobenius norm of its folded update `‖B̃·Ã‖_F` (by the upload weights when every norm is 0).
    case hetlora
    /// The exact low-rank projection (FlexLoRA, HLoRA): the best rank-R approximation of
    /// `Σ w·B̃·Ã / Σ w`, as balanced factors; every prefix is the best at its rank.
    case svd

    /// Whether LoRA tensors are computed a module (A and B together) at a time, rather than summed
    /// tensor by tensor like dense ones.
    var worksPerModule: Bool { self == .hetlora || self == .svd }
}

/// The scale an aggregate is unfolded to (openapi.yaml's aggregation semantics, step 3). The engine
/// mixes folded factors (`√s·A`, `√s·B`), so the result is at scale 1 until it is divided by `√s_t`.
public enum TargetScaling: Sendable, Equatable {
    /// Scale 1: the global adapter as emitted (its config says `lora_alpha = r`).
    case unit
    /// One `lora_alpha` for every module, as PEFT applies it: `s_m = lora_alpha / r_m` (`/ √r_m` with
    /// rsLoRA), `r_m` the module's rank in the answer.
    case uniform(loraAlpha: Double, useRSLoRA: Bool)
    /// A client's own adapter: each module cut to its rank in `config` and unfolded with its scale there.
    case client(AdapterConfig)
}

/// What to produce from a round.
public struct AggregationOptions: Sendable {
    public var strategy: AggregationStrategy
    /// The largest rank of the LoRA tensors in the result, 1...global rank (modules of a lower global
    /// rank keep theirs); nil means the global rank. Ignored for a `.client` scaling.
    public var rank: Int?
    public var dtype: DType
    public var scaling: TargetScaling
    /// Extra `__metadata__` entries (the engine sets format, strategy, rank and clients itself).
    public var metadata: [String: String]
    /// The hot loops' implementation; every set gives the same bytes.
    public var kernels: KernelSet

    public init(
        strategy: AggregationStrategy = .replication, rank: Int? = nil, dtype: DType = .f32, scaling: TargetScaling = .unit,
        metadata: [String: String] = [:], kernels: KernelSet = .best
    ) {
        self.strategy = strategy
        self.rank = rank
        self.dtype = dtype
        self.scaling = scaling
        self.metadata = metadata
        self.kernels = kernels
    }
}

/// The aggregate: a complete safetensors file.
public struct AggregatedAdapter: Sendable {
    public let bytes: [UInt8]
    /// The largest rank of the LoRA tensors in `bytes`.
    public let rank: Int
    /// The largest module rank in the round.
    public let globalRank: Int
    public let clientCount: Int
}

/// Sees an aggregate's bytes while the engine writes them, in file order: the header, then each
/// tensor as it is finished.
public protocol AggregationOutputObserver: AnyObject {
    /// Called once with the file's size, as soon as it is known and before any tensor is read: a
    /// response can send its head with `Content-Length` then.
    func outputWillBegin(byteCount: Int)
    /// `bytes` are final and stay valid until `outputComplete()` has returned.
    func regionFinished(_ bytes: UnsafeRawBufferPointer)
    /// Called once, after the last region or when aggregation fails; the observer must be done
    /// with every region when it returns.
    func outputComplete()
}
