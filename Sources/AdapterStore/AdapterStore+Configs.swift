import LoRAAdapters

extension AdapterStore {
    /// The configs of the round's uploads and the modules they hold; nil when it has no uploads.
    public func configs(federation: FederationID, round: RoundNumber) async throws -> RoundConfigs? {
        try await reader.read { connection in try Self.roundConfigs(connection, federation, round) }
    }

    static func roundConfigs(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> RoundConfigs? {
        let statement = try connection.statement(
            "SELECT client, \(AdapterConfig.storedColumns) FROM uploads WHERE federation = ?1 AND round = ?2 ORDER BY client")
        try statement.bind(.id(federation), .round(round))
        let uploads = try statement.rows { row in
            RoundConfigs.Upload(
                client: ClientID(stored: row.text(0)), config: try AdapterConfig(storedRow: row, from: 1), json: row.isNull(4) ? nil : row.blob(4))
        }
        guard !uploads.isEmpty else { return nil }
        let names = try connection.statement(
            "SELECT DISTINCT t.name FROM tensors t JOIN uploads u ON t.upload_id = u.id WHERE u.federation = ?1 AND u.round = ?2")
        try names.bind(.id(federation), .round(round))
        let baseRanks = try baseRanks(connection, federation, round)
        let modules = Set(try names.rows { TensorRole.moduleName(ofTensor: $0.text(0)) }.compactMap { $0 }).union(baseRanks.keys)
        return RoundConfigs(uploads: uploads, modules: modules, baseRanks: baseRanks)
    }
}
