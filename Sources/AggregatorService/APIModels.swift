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
    @NullWhenAbsent var sealedBy: String?
    let deadlineMissed: Bool
    let maxRank: Int
    let totalWeight: Double
    let uploads: [Upload]
    @NullWhenAbsent var base: Base?

    init(_ record: RoundRecord) {
        federation = record.federation
        round = record.round
        sealed = record.sealed
        _sealedBy = NullWhenAbsent(wrappedValue: record.sealedBy?.rawValue)
        deadlineMissed = record.deadlineMissed
        maxRank = record.maxRank
        totalWeight = record.totalWeight
        _base = NullWhenAbsent(wrappedValue: record.base.map { Base(rank: $0.rank, sha256: $0.sha256, source: $0.source.rawValue) })
        uploads = record.uploads.map {
            Upload(
                client: $0.client, rank: $0.rank, weight: $0.weight, loraAlpha: $0.loraAlpha, useRslora: $0.useRSLoRA, bytes: $0.bytes, sha256: $0.sha256,
                uploadedAt: $0.uploadedAt)
        }
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

/// An optional member encoded as `null` when it has no value, where a synthesized Encodable would
/// leave it out: openapi.yaml's bodies name every member.
@propertyWrapper
struct NullWhenAbsent<Value: Encodable>: Encodable {
    private let value: Value?
    var wrappedValue: Value? { value }

    init(wrappedValue: Value?) { value = wrappedValue }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let value { try container.encode(value) } else { try container.encodeNil() }
    }
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
