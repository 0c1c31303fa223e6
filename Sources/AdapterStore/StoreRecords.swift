import LoRAAdapters

/// A client's stored upload, as listed in a round.
public struct UploadRecord: Sendable, Equatable {
    public let client: ClientID
    /// The config's `r`.
    public let rank: Int
    public let weight: Double
    public let loraAlpha: Double
    public let useRSLoRA: Bool
    /// Size of the decompressed safetensors file.
    public let bytes: Int
    public let sha256: String
    /// UTC, ISO 8601 with milliseconds.
    public let uploadedAt: String
}

public struct RoundRecord: Sendable, Equatable {
    public let federation: FederationID
    public let round: RoundNumber
    public let sealed: Bool
    /// Nil while open.
    public let sealedBy: SealReason?
    /// Its timeout passed without `min_uploads`; it stays open.
    public let deadlineMissed: Bool
    /// Sorted by client id.
    public let uploads: [UploadRecord]
    /// The largest rank of any module (`rank_pattern` and the base included), the global rank by default.
    public let maxRank: Int
    public let base: BaseRecord?
    public var totalWeight: Double { uploads.reduce(0) { $0 + $1.weight } }
}

public struct RoundSummary: Sendable, Equatable {
    public let round: RoundNumber
    public let sealed: Bool
    public let uploads: Int
    public let maxRank: Int
}

/// An upload to store: already parsed and validated on its own by `AdapterValidator`.
public struct NewUpload: Sendable {
    public let federation: FederationID
    public let round: RoundNumber
    public let client: ClientID
    public let weight: Double
    /// The ranks and scales of its modules.
    public let config: AdapterConfig
    /// `adapter_config.json` as the client sent it (kept byte for byte), or nil for an upload tagged
    /// by query parameters.
    public let configJSON: [UInt8]?
    public let file: SafetensorsFile
    public let sha256: String

    public init(
        federation: FederationID, round: RoundNumber, client: ClientID, weight: Double, config: AdapterConfig, configJSON: [UInt8]? = nil,
        file: SafetensorsFile, sha256: String
    ) {
        self.federation = federation
        self.round = round
        self.client = client
        self.weight = weight
        self.config = config
        self.configJSON = configJSON
        self.file = file
        self.sha256 = sha256
    }

    /// An upload tagged with one rank for every module, at scale 1.
    public init(federation: FederationID, round: RoundNumber, client: ClientID, rank: Int, weight: Double, file: SafetensorsFile, sha256: String) {
        self.init(federation: federation, round: round, client: client, weight: weight, config: AdapterConfig(unscaledRank: rank), file: file, sha256: sha256)
    }

    public var rank: Int { config.rank }
}

/// An aggregate file with its digest (the strong ETag).
public struct StoredAggregate: Sendable {
    public let bytes: [UInt8]
    /// `AggregateTag`: names the bytes before they exist.
    public internal(set) var tag: String
    /// Nil while a streamed first computation is still being hashed (a cached copy may be handed
    /// out meanwhile).
    public internal(set) var sha256: String?
    public let rank: Int
    /// True when it came from the cache rather than a fresh aggregation.
    public internal(set) var fromCache: Bool

    /// The same aggregate, as handed out by the cache.
    var asCached: StoredAggregate {
        var cached = self
        cached.fromCache = true
        return cached
    }
}

/// An aggregate's digest and size, known before its bytes are.
public struct AggregateDigest: Sendable, Equatable {
    public let sha256: String
    public let byteCount: Int
    public let rank: Int
    /// What a recomputation of the same bytes is checked against, cheaper than the SHA-256.
    let crc32: UInt32
}

/// What to do with an aggregate that is not in memory, given its tag and, when it was computed
/// before, its digest on record.
public enum AggregatePlan: Sendable {
    /// Nothing more: the caller needs only the tag and what is on record (a conditional request
    /// that matches, a HEAD whose length is on record).
    case bodiless
    /// Compute it and hand over its bytes as they are produced.
    case stream
    /// Compute it and hand over the whole file.
    case compute
}

public enum AggregateOutcome: Sendable {
    /// From the cache, or computed now.
    case complete(StoredAggregate)
    /// Not computed (`AggregatePlan.bodiless`).
    case bodiless(tag: String, recorded: AggregateDigest?)
    /// Being computed: the file in order, in pieces, `byteCount` in all; the SHA-256 when on record.
    /// With a record, the stream fails and its last piece is withheld when the bytes do not match.
    /// `joined`: another request's computation of the same aggregate, already under way, is shared.
    case streaming(tag: String, byteCount: Int, sha256: String?, pieces: AsyncThrowingStream<[UInt8], any Error>, joined: Bool)
}

/// What the round's uploads say about their ranks and scales: what an `adapter_config.json`
/// for one of its downloads is made from.
public struct RoundConfigs: Sendable {
    public struct Upload: Sendable {
        public let client: ClientID
        public let config: AdapterConfig
        /// `adapter_config.json` as the client sent it, or nil for an upload tagged by query parameters.
        public let json: [UInt8]?
    }

    /// Sorted by client id.
    public let uploads: [Upload]
    /// Every LoRA module that any upload or the base holds.
    public let modules: Set<String>
    /// The base's rank of each module it holds.
    public let baseRanks: [String: Int]

    /// Each module's global rank: the largest any upload or the base gives it.
    public func globalModuleRanks() -> [String: Int] {
        let ranks = ModuleRanks(configs: uploads.map(\.config), baseRanks: baseRanks)
        return Dictionary(uniqueKeysWithValues: modules.map { ($0, ranks.globalRank(ofModule: $0)) })
    }

    /// The round's global rank: the largest of its modules'.
    public var globalRank: Int { globalModuleRanks().values.max() ?? 0 }
}

/// Where a round's base came from.
public enum BaseSource: String, Sendable {
    /// `PUT …/base`.
    case upload
    /// The previous round's aggregate, stored when that round was sealed with `chain` on.
    case chain
}

/// A round's base: the global adapter it started from, held at scale 1.
public struct BaseRecord: Sendable, Equatable {
    /// The largest rank of its modules.
    public let rank: Int
    /// Size and SHA-256 of the stored (scale-1) safetensors file.
    public let bytes: Int
    public let sha256: String
    public let source: BaseSource
}
