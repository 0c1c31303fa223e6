import LoRAAdapters

/// A client's stored upload, as listed in a round.
public struct UploadRecord: Sendable, Equatable {
    public let client: ClientID
    public let rank: Int
    public let weight: Double
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
    /// Sorted by client id.
    public let uploads: [UploadRecord]
    public var maxRank: Int { uploads.map(\.rank).max() ?? 0 }
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
    public let rank: Int
    public let weight: Double
    public let file: SafetensorsFile
    public let sha256: String

    public init(federation: FederationID, round: RoundNumber, client: ClientID, rank: Int, weight: Double, file: SafetensorsFile, sha256: String) {
        self.federation = federation
        self.round = round
        self.client = client
        self.rank = rank
        self.weight = weight
        self.file = file
        self.sha256 = sha256
    }
}

/// An aggregate file with its digest (the strong ETag).
public struct StoredAggregate: Sendable {
    public let bytes: [UInt8]
    public let sha256: String
    public let rank: Int
    /// True when it came from the cache rather than a fresh aggregation.
    public let fromCache: Bool
}

/// An aggregate's digest and size, known before its bytes are.
public struct AggregateDigest: Sendable, Equatable {
    public let sha256: String
    public let byteCount: Int
    public let rank: Int
    /// What a recomputation of the same bytes is checked against, cheaper than the SHA-256.
    let crc32: UInt32
}

/// What to do with an aggregate that is not in memory but whose digest is on record.
public enum KnownDigestPlan: Sendable {
    /// Nothing more: the caller needs only the digest (a conditional request that matches, a HEAD).
    case digestOnly
    /// Compute it and hand over its bytes as they are produced, checked against the digest.
    case stream
    /// Compute it and hand over the whole file.
    case compute
}

public enum AggregateOutcome: Sendable {
    /// From the cache, or computed now.
    case complete(StoredAggregate)
    /// On record and not computed (`KnownDigestPlan.digestOnly`).
    case digestOnly(AggregateDigest)
    /// On record and being computed: the file in order, in pieces. The stream fails, and its last
    /// piece is withheld, when the bytes do not match the digest on record.
    case streaming(AggregateDigest, AsyncThrowingStream<[UInt8], any Error>)
}
