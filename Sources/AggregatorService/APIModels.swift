import AdapterStore

/// Response bodies of API v1 (keys become snake_case when encoded).
struct UploadAccepted: Encodable {
    let federation: String
    let round: Int64
    let client: String
    let rank: Int
    let weight: Double
    let tensors: Int
    let loraModules: Int
    let bytes: Int
    let sha256: String
}

struct RoundBody: Encodable {
    struct Upload: Encodable {
        let client: String
        let rank: Int
        let weight: Double
        let bytes: Int
        let sha256: String
        let uploadedAt: String
    }

    let federation: String
    let round: Int64
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
        uploads = record.uploads.map { Upload(client: $0.client, rank: $0.rank, weight: $0.weight, bytes: $0.bytes, sha256: $0.sha256, uploadedAt: $0.uploadedAt) }
    }
}

struct RoundList: Encodable {
    struct Entry: Encodable {
        let round: Int64
        let sealed: Bool
        let uploads: Int
        let maxRank: Int
    }

    let federation: String
    let rounds: [Entry]
}

struct Health: Encodable {
    let status: String
}

/// A client token, shown once.
struct IssuedToken: Encodable {
    let token: String
}
