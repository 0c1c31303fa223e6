extension AdapterStore {
    /// The round with its uploads and base; nil when it has neither and is not sealed.
    public func round(federation: FederationID, round: RoundNumber) async throws -> RoundRecord? {
        try await reader.read { connection in try Self.roundRecord(connection, federation, round) }
    }

    public func rounds(federation: FederationID) async throws -> [RoundSummary] {
        try await reader.read { connection in
            let statement = try connection.statement(
                """
                SELECT r.round, r.sealed, count(u.id), r.max_rank FROM rounds r
                LEFT JOIN uploads u ON u.federation = r.federation AND u.round = r.round
                WHERE r.federation = ?1 GROUP BY r.round
                HAVING count(u.id) > 0 OR r.sealed OR EXISTS (SELECT 1 FROM bases b WHERE b.federation = r.federation AND b.round = r.round)
                ORDER BY r.round
                """)
            try statement.bind(.id(federation))
            return try statement.rows(RoundSummary.init(row:))
        }
    }

    /// Seals the round (idempotent; an empty round can be sealed too) and returns it.
    public func seal(federation: FederationID, round: RoundNumber) async throws -> RoundRecord {
        try await writer.write { connection in
            try connection.statement("INSERT INTO rounds (federation, round, sealed) VALUES (?1, ?2, 1) ON CONFLICT DO UPDATE SET sealed = 1")
                .bind(.id(federation), .round(round)).run()
            return try Self.roundRecord(connection, federation, round)!
        }
    }

    private static func roundRecord(_ connection: SQLiteConnection, _ federation: FederationID, _ round: RoundNumber) throws -> RoundRecord? {
        let statement = try connection.statement("SELECT sealed, max_rank FROM rounds WHERE federation = ?1 AND round = ?2")
        try statement.bind(.id(federation), .round(round))
        let exists = try statement.step()
        let sealed = exists && statement.integer(0) != 0
        let uploads = try uploadRecords(connection, federation, round)
        let base = try baseRecord(connection, federation, round)
        guard sealed || !uploads.isEmpty || base != nil else { return nil }
        return RoundRecord(
            federation: federation, round: round, sealed: sealed, uploads: uploads, maxRank: exists ? Int(statement.integer(1)) : 0, base: base)
    }
}
