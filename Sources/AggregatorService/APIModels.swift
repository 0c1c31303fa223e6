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

struct RoundBody: Encodable {
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
    let maxRank: Int
    let totalWeight: Double
    let uploads: [Upload]

    init(_ record: RoundRecord) {
        federation = record.federation
        round = record.round
        sealed = record.sealed
        maxRank = record.maxRank
        totalWeight = record.totalWeight
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
