import LoRAAdapters

/// Records decode their own rows: each names the columns it reads, in the order it reads them.
extension UploadRecord {
    static let columns = "client, rank, weight, bytes, sha256, uploaded_at, coalesce(lora_alpha, rank), use_rslora"

    init(row: any StoreStatement) {
        self.init(
            client: ClientID(stored: row.text(0)), rank: Int(row.integer(1)), weight: row.real(2), loraAlpha: row.real(6), useRSLoRA: row.integer(7) != 0,
            bytes: Int(row.integer(3)), sha256: row.text(4), uploadedAt: row.text(5))
    }
}

extension RoundSummary {
    /// Reads (round, sealed, upload count, highest rank).
    init(row: any StoreStatement) {
        self.init(round: RoundNumber(stored: row.integer(0)), sealed: row.integer(1) != 0, uploads: Int(row.integer(2)), maxRank: Int(row.integer(3)))
    }
}

extension AggregateDigest {
    static let columns = "sha256, bytes, crc32"

    /// The rank is part of the row's key, not of its columns.
    init(row: any StoreStatement, rank: Int) {
        self.init(sha256: row.text(0), byteCount: Int(row.integer(1)), rank: rank, crc32: UInt32(truncatingIfNeeded: row.integer(2)))
    }
}

extension AdapterConfig {
    static let storedColumns = "rank, lora_alpha, use_rslora, config"

    /// An upload's config from `storedColumns`, starting at `column`: the JSON it sent, else its tags.
    init(storedRow row: any StoreStatement, from column: Int32) throws {
        if row.isNull(column + 3) {
            try self.init(
                rank: Int(row.integer(column)), loraAlpha: row.isNull(column + 1) ? nil : row.real(column + 1), useRSLoRA: row.integer(column + 2) != 0)
        } else {
            try self.init(json: row.blob(column + 3))
        }
    }
}
