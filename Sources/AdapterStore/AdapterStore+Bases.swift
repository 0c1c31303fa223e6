import LoRAAdapters

extension AdapterStore {
    /// Stores `file` (at scale 1) as the round's base in one transaction, replacing an earlier one;
    /// returns its record and whether it is new. Throws `roundSealed`, or `shapeMismatch` when a
    /// tensor disagrees with the round's uploads apart from the rank axis; nothing is written then.
    public func putBase(federation: FederationID, round: RoundNumber, file: SafetensorsFile, sha256: String) async throws -> (
        record: BaseRecord, created: Bool
    ) {
        defer { scheduleCheckpoint() }
        return try await writer.write { connection in
            try Self.ensureRoundOpen(connection, federation, round)
            let replaced = try Self.storeBase(file, sha256: sha256, source: .upload, federation, round, connection)
            try Self.roundChanged(connection, federation, round)
            return (try Self.baseRecord(connection, federation, round)!, !replaced)
        }
    }

    /// Deletes the round's base; false when there was none. Throws `roundSealed`.
    public func deleteBase(federation: FederationID, round: RoundNumber) async throws -> Bool {
        defer { scheduleCheckpoint() }
        return try await writer.write { connection in
            try Self.ensureRoundOpen(connection, federation, round)
            try connection.statement("DELETE FROM bases WHERE federation = ?1 AND round = ?2").bind(.id(federation), .round(round)).run()
            guard connection.changes > 0 else { return false }
            try Self.roundChanged(connection, federation, round)
            return true
        }
    }

    /// The round's base as stored (at scale 1; a chained base is the previous round's aggregate,
    /// byte for byte), with its record; nil when the round has none.
    public func storedBase(federation: FederationID, round: RoundNumber) async throws -> (record: BaseRecord, file: [UInt8])? {
        try await reader.read { connection in try Self.storedBaseFile(connection, federation, round) }
    }

    static func storedBaseFile(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> (
        record: BaseRecord, file: [UInt8]
    )? {
        guard let record = try baseRecord(connection, federation, round) else { return nil }
        let header = try connection.statement("SELECT id, header FROM bases WHERE federation = ?1 AND round = ?2")
        try header.bind(.id(federation), .round(round))
        _ = try header.step()
        return (
            record,
            try storedFile(header: header.blob(1), tensors: "base_tensors", owner: "base_id", ownerID: header.integer(0), byteCount: record.bytes, connection)
        )
    }

    /// The round's base truncated to `rank` and unfolded to `scaling`, as an aggregate of a round
    /// with no uploads would be; nil when the round has no base. Throws `rankOutOfRange`.
    public func baseAdapter(federation: FederationID, round: RoundNumber, rank: Int?, dtype: DType, scaling: TargetScaling) async throws -> [UInt8]? {
        try await reader.read { connection in
            guard let record = try Self.baseRecord(connection, federation, round) else { return nil }
            let source = StoreAdapterSource(connection: connection, federation: federation, round: round, includesUploads: false)
            let options = AggregationOptions(
                strategy: .replication, rank: rank, dtype: dtype, scaling: scaling,
                metadata: ["federation": federation.rawValue, "round": round.description, "base": record.source.rawValue])
            return try AdapterAggregator.aggregate(source, options: options).bytes
        }
    }

    /// Replaces the round's base with `file`; true when it replaced one. The caller has checked the
    /// round is open and marks it changed.
    static func storeBase(
        _ file: SafetensorsFile, sha256: String, source: BaseSource, _ federation: FederationID, _ round: RoundNumber, _ connection: any StoreConnection
    ) throws -> Bool {
        try checkShapes(of: file, in: federation, round, except: nil, base: false, connection)
        try connection.statement("DELETE FROM bases WHERE federation = ?1 AND round = ?2").bind(.id(federation), .round(round)).run()
        let replaced = connection.changes > 0
        let rank = ModuleRanks.ranks(of: file.tensors.map { BaseTensor(name: $0.name, dtype: $0.dtype, shape: $0.shape) }).values.max() ?? 0
        let inserted = try connection.statement(
            """
            INSERT INTO bases (federation, round, rank, bytes, sha256, source, created_at, header)
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id
            """
        ).bind(
            .id(federation), .round(round), .integer(Int64(rank)), .integer(Int64(file.bytes.count)), .text(sha256), .text(source.rawValue), .now,
            .blob(file.headerBytes)
        )
        try insertTensors(of: file, into: "base_tensors", owner: "base_id", ownerID: try returnedID(inserted), connection)
        return replaced
    }

    static func baseRecord(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> BaseRecord? {
        let statement = try connection.statement("SELECT rank, bytes, sha256, source FROM bases WHERE federation = ?1 AND round = ?2")
        try statement.bind(.id(federation), .round(round))
        guard try statement.step() else { return nil }
        return BaseRecord(
            rank: Int(statement.integer(0)), bytes: Int(statement.integer(1)), sha256: statement.text(2),
            source: BaseSource(rawValue: statement.text(3)) ?? .upload)
    }

    /// The rank of each module the round's base holds (empty without a base).
    static func baseRanks(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> [String: Int] {
        ModuleRanks.ranks(of: try StoreAdapterSource(connection: connection, federation: federation, round: round).baseTensors())
    }
}
