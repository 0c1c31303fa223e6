import LoRAAdapters

extension AdapterStore {
    /// Stores `upload` in one transaction, replacing the client's earlier upload; returns its record,
    /// whether it is new, and why it sealed the round if it did (`max_uploads`, a quorum without
    /// grace). Throws
    /// `roundSealed`, or `shapeMismatch` when a tensor disagrees with the round's other uploads or
    /// base apart from the rank axis; nothing is written then.
    public func put(_ upload: NewUpload) async throws -> (record: UploadRecord, created: Bool, sealed: SealReason?) {
        defer { scheduleCheckpoint() }
        return try await writer.write { connection in
            try Self.ensureRoundOpen(connection, upload.federation, upload.round)
            try Self.checkShapes(of: upload, against: connection)
            let existing = try connection.statement("DELETE FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
            try existing.bind(.id(upload.federation), .round(upload.round), .id(upload.client)).run()
            let replaced = connection.changes > 0

            let inserted = try connection.statement(
                """
                INSERT INTO uploads (federation, round, client, rank, weight, bytes, sha256, uploaded_at, header, lora_alpha, use_rslora, config)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING id
                """
            ).bind(
                .id(upload.federation), .round(upload.round), .id(upload.client), .integer(Int64(upload.rank)),
                .real(upload.weight), .integer(Int64(upload.file.bytes.count)), .text(upload.sha256), .now,
                .blob(upload.file.headerBytes), .real(upload.config.loraAlpha), .integer(upload.config.useRSLoRA ? 1 : 0),
                upload.configJSON.map { .blob($0) } ?? .null
            )
            try Self.insertTensors(of: upload.file, into: "tensors", owner: "upload_id", ownerID: try Self.returnedID(inserted), connection)
            try Self.roundChanged(connection, upload.federation, upload.round)
            let record = try Self.uploadRecords(connection, upload.federation, upload.round, client: upload.client)[0]
            return (record, !replaced, try Self.roundReceivedUpload(connection, upload.federation, upload.round))
        }
    }

    /// The client's stored file, byte for byte as uploaded (decompressed), with its record.
    public func upload(federation: FederationID, round: RoundNumber, client: ClientID) async throws -> (record: UploadRecord, file: [UInt8])? {
        try await reader.read { connection in
            guard let record = try Self.uploadRecords(connection, federation, round, client: client).first else { return nil }
            let header = try connection.statement("SELECT id, header FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
            try header.bind(.id(federation), .round(round), .id(client))
            guard try header.step() else { return nil }
            return (
                record,
                try Self.storedFile(
                    header: header.blob(1), tensors: "tensors", owner: "upload_id", ownerID: header.integer(0), byteCount: record.bytes, connection)
            )
        }
    }

    /// A stored file rebuilt: its header, then its tensors' bytes in offset order (they tile the data section).
    static func storedFile(header: [UInt8], tensors table: String, owner: String, ownerID: Int64, byteCount: Int, _ connection: any StoreConnection) throws
        -> [UInt8]
    {
        var file = header
        file.reserveCapacity(byteCount)
        let tensors = try connection.statement("SELECT data FROM \(table) WHERE \(owner) = ?1 ORDER BY data_offset")
        try tensors.bind(.integer(ownerID))
        while try tensors.step() { tensors.withBlob(0) { file.append(contentsOf: $0) } }
        return file
    }

    /// Deletes the client's upload; false when there was none. Throws `roundSealed`.
    public func deleteUpload(federation: FederationID, round: RoundNumber, client: ClientID) async throws -> Bool {
        defer { scheduleCheckpoint() }
        return try await writer.write { connection in
            try Self.ensureRoundOpen(connection, federation, round)
            try connection.statement("DELETE FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
                .bind(.id(federation), .round(round), .id(client)).run()
            guard connection.changes > 0 else { return false }
            try Self.roundChanged(connection, federation, round)
            return true
        }
    }

    /// One row per tensor of `file` in `table` (`tensors` or `base_tensors`), under its owner's id.
    static func insertTensors(of file: SafetensorsFile, into table: String, owner: String, ownerID: Int64, _ connection: any StoreConnection) throws {
        let insert = try connection.statement("INSERT INTO \(table) (\(owner), name, dtype, shape, data_offset, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        for tensor in file.tensors {
            try file.withBytes(of: tensor) { data in
                insert.reset()
                try insert.bind(
                    .integer(ownerID), .text(tensor.name), .text(tensor.dtype.rawValue), .text(StoreAdapterSource.shapeText(tensor.shape)),
                    .integer(Int64(tensor.byteRange.lowerBound)), .borrowedBlob(data)
                ).run()
            }
        }
    }

    /// The largest rank of any module of the round: uploads' configs (`rank_pattern` included) and its base.
    static func globalRank(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> Int {
        try roundConfigs(connection, federation, round)?.globalRank ?? baseRanks(connection, federation, round).values.max() ?? 0
    }

    /// Every round's `max_rank` anew, for a database migrated from before it was kept (migration 5
    /// could only take each round's largest `r`).
    static func recomputeGlobalRanks(_ connection: any StoreConnection) throws {
        let rounds = try connection.statement("SELECT federation, round FROM rounds").rows {
            (FederationID(stored: $0.text(0)), RoundNumber(stored: $0.integer(1)))
        }
        for (federation, round) in rounds {
            try connection.statement("UPDATE rounds SET max_rank = ?3 WHERE federation = ?1 AND round = ?2")
                .bind(.id(federation), .round(round), .integer(Int64(try globalRank(connection, federation, round)))).run()
        }
    }

    /// The round's upload records (or only `client`'s), sorted by client id.
    static func uploadRecords(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber, client: ClientID? = nil) throws
        -> [UploadRecord]
    {
        let statement = try connection.statement(
            """
            SELECT \(UploadRecord.columns) FROM uploads
            WHERE federation = ?1 AND round = ?2 AND (CAST(?3 AS TEXT) IS NULL OR client = ?3) ORDER BY client
            """)
        try statement.bind(.id(federation), .round(round), client.map { .id($0) } ?? .null)
        return try statement.rows(UploadRecord.init(row:))
    }

    /// The `id` an `INSERT … RETURNING id` gave its new row.
    /// The statement is reset after: SQLite keeps one that has not run to its end in progress.
    static func returnedID(_ insert: any StoreStatement) throws -> Int64 {
        defer { insert.reset() }
        guard try insert.step() else { throw StoreError(.database, "an insert returned no id") }
        return insert.integer(0)
    }

    /// The round's row, created empty when missing.
    static func ensureRoundRow(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws {
        try connection.statement("INSERT INTO rounds (federation, round) VALUES (?1, ?2) ON CONFLICT DO NOTHING").bind(.id(federation), .round(round)).run()
    }

    static func ensureRoundOpen(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws {
        try ensureRoundRow(connection, federation, round)
        let sealed = try connection.statement("SELECT sealed FROM rounds WHERE federation = ?1 AND round = ?2")
        try sealed.bind(.id(federation), .round(round))
        if try sealed.step(), sealed.integer(0) != 0 {
            throw StoreError(.roundSealed, "round \(round) of federation '\(federation)' is sealed")
        }
    }

    /// Every tensor of `upload` against the same name in the round's other uploads and its base.
    private static func checkShapes(of upload: NewUpload, against connection: any StoreConnection) throws {
        try checkShapes(of: upload.file, in: upload.federation, upload.round, except: upload.client, base: true, connection)
    }

    /// Every tensor of `file` against the same name in the round's uploads (but `client`'s) and,
    /// with `base`, the round's base.
    static func checkShapes(
        of file: SafetensorsFile, in federation: FederationID, _ round: RoundNumber, except client: ClientID?, base: Bool, _ connection: any StoreConnection
    ) throws {
        let statement = try connection.statement(
            """
            SELECT t.name, t.shape FROM uploads u JOIN tensors t ON t.upload_id = u.id
            WHERE u.federation = ?1 AND u.round = ?2 AND (CAST(?3 AS TEXT) IS NULL OR u.client != ?3)
            UNION ALL
            SELECT t.name, t.shape FROM bases b JOIN base_tensors t ON t.base_id = b.id
            WHERE ?4 <> 0 AND b.federation = ?1 AND b.round = ?2
            """)
        try statement.bind(.id(federation), .round(round), client.map { .id($0) } ?? .null, .integer(base ? 1 : 0))
        var checked: Set<String> = []
        while try statement.step() {
            let name = statement.text(0)
            guard let tensor = file.tensor(named: name), checked.insert(name).inserted else { continue }
            try RoundShapeCheck.check(name: tensor.name, shape: tensor.shape, against: StoreAdapterSource.shape(statement.text(1)))
        }
    }

    /// A change to a round's uploads: a new revision, so no cached aggregate or recorded digest of
    /// it matches any more (and the recorded ones can go), and its global rank anew.
    static func roundChanged(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws {
        let globalRank = try globalRank(connection, federation, round)
        try connection.statement("UPDATE rounds SET revision = revision + 1, max_rank = ?3 WHERE federation = ?1 AND round = ?2")
            .bind(.id(federation), .round(round), .integer(Int64(globalRank))).run()
        try connection.statement("DELETE FROM aggregate_digests WHERE federation = ?1 AND round = ?2")
            .bind(.id(federation), .round(round)).run()
    }
}
