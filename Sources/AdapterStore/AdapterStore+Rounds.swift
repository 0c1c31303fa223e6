import LoRAAdapters

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
                WHERE r.federation = ?1 GROUP BY r.federation, r.round
                HAVING count(u.id) > 0 OR r.sealed <> 0 OR EXISTS (SELECT 1 FROM bases b WHERE b.federation = r.federation AND b.round = r.round)
                ORDER BY r.round
                """)
            try statement.bind(.id(federation))
            return try statement.rows(RoundSummary.init(row:))
        }
    }

    static func roundRecord(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> RoundRecord? {
        let statement = try connection.statement("SELECT sealed, max_rank, sealed_by, deadline_missed FROM rounds WHERE federation = ?1 AND round = ?2")
        try statement.bind(.id(federation), .round(round))
        let exists = try statement.step()
        let sealed = exists && statement.integer(0) != 0
        let uploads = try uploadRecords(connection, federation, round)
        let base = try baseRecord(connection, federation, round)
        guard sealed || !uploads.isEmpty || base != nil else { return nil }
        return RoundRecord(
            federation: federation, round: round, sealed: sealed, sealedBy: sealed ? SealReason(rawValue: statement.text(2)) : nil,
            deadlineMissed: exists && statement.integer(3) != 0, uploads: uploads, maxRank: exists ? Int(statement.integer(1)) : 0, base: base)
    }
}

extension AdapterStore {
    /// The round's uploads, which tensors each holds, and its base's tensors (no data), as the
    /// aggregation sees them.
    public func holdings(federation: FederationID, round: RoundNumber) async throws -> (
        participants: [RoundParticipant], holdings: [TensorHolding], base: [BaseTensor]
    ) {
        try await reader.read { connection in
            let source = StoreAdapterSource(connection: connection, federation: federation, round: round)
            return (try source.participants(), try source.holdings(), try source.baseTensors())
        }
    }
}
