import AdapterStore
import HTTPServer

/// Response bodies of API v1 (keys become snake_case when encoded).
struct UploadAccepted: Encodable {
    let federation: FederationID
    let round: RoundNumber
    let client: ClientID
    let rank: Int
    let weight: Double
    let loraAlpha: Double
    let useRslora: Bool
    let tensors: Int
    let loraModules: Int
    let bytes: Int
    let sha256: String
}

struct BaseAccepted: Encodable {
    let federation: FederationID
    let round: RoundNumber
    /// The largest rank of its modules.
    let rank: Int
    /// The scale it was sent at (it is stored folded to scale 1).
    let loraAlpha: Double
    let useRslora: Bool
    let tensors: Int
    let loraModules: Int
    /// Of the base as stored, at scale 1.
    let bytes: Int
    let sha256: String
    let source: String
}

struct RoundBody: Encodable {
    struct Base: Encodable {
        let rank: Int
        let sha256: String
        let source: String
    }

    struct Upload: Encodable {
        let client: ClientID
        let rank: Int
        let weight: Double
        let loraAlpha: Double
        let useRslora: Bool
        let bytes: Int
        let sha256: String
        let uploadedAt: String
    }

    let federation: FederationID
    let round: RoundNumber
    let sealed: Bool
    let sealedBy: String?
    let deadlineMissed: Bool
    let maxRank: Int
    let totalWeight: Double
    let uploads: [Upload]
    /// Encoded as null without a base.
    let base: Base?

    init(_ record: RoundRecord) {
        federation = record.federation
        round = record.round
        sealed = record.sealed
        sealedBy = record.sealedBy?.rawValue
        deadlineMissed = record.deadlineMissed
        maxRank = record.maxRank
        totalWeight = record.totalWeight
        base = record.base.map { Base(rank: $0.rank, sha256: $0.sha256, source: $0.source.rawValue) }
        uploads = record.uploads.map {
            Upload(
                client: $0.client, rank: $0.rank, weight: $0.weight, loraAlpha: $0.loraAlpha, useRslora: $0.useRSLoRA, bytes: $0.bytes, sha256: $0.sha256,
                uploadedAt: $0.uploadedAt)
        }
    }

    private enum CodingKeys: String, CodingKey {
        case federation, round, sealed, sealedBy, deadlineMissed, maxRank, totalWeight, uploads, base
    }

    /// Spelled out so that members without a value are null, not missing (openapi.yaml, "Round").
    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(federation, forKey: .federation)
        try container.encode(round, forKey: .round)
        try container.encode(sealed, forKey: .sealed)
        try container.encode(sealedBy, forKey: .sealedBy)
        try container.encode(deadlineMissed, forKey: .deadlineMissed)
        try container.encode(maxRank, forKey: .maxRank)
        try container.encode(totalWeight, forKey: .totalWeight)
        try container.encode(uploads, forKey: .uploads)
        try container.encode(base, forKey: .base)
    }
}

struct RoundList: Encodable {
    struct Entry: Encodable {
        let round: RoundNumber
        let sealed: Bool
        let uploads: Int
        let maxRank: Int
    }

    let federation: FederationID
    let rounds: [Entry]
}

struct Health: Encodable {
    let status: String
}

/// A client token, shown once.
struct IssuedToken: Encodable {
    let token: String
}

extension HTTPResponse {
    /// A JSON body (`JSON.encode`: sorted keys, snake_case).
    static func json(_ status: HTTPStatus, _ value: some Encodable) -> HTTPResponse {
        HTTPResponse(status: status, headers: ["Content-Type": "application/json"], body: JSON.encode(value))
    }
}
