extension AdapterStore {
    /// Records a token for the client, by its hash only.
    public func addClientToken(hash: String, federation: FederationID, client: ClientID) async throws {
        try await writer.write { connection in
            try connection.statement(
                "INSERT INTO client_tokens (token_hash, federation, client, created_at) VALUES (?1, ?2, ?3, ?4)"
            )
            .bind(.text(hash), .id(federation), .id(client), .now).run()
        }
    }

    /// Revokes every token of the client; returns how many there were.
    @discardableResult
    public func revokeClientTokens(federation: FederationID, client: ClientID) async throws -> Int {
        try await writer.write { connection in
            try connection.statement("DELETE FROM client_tokens WHERE federation = ?1 AND client = ?2").bind(.id(federation), .id(client)).run()
            return connection.changes
        }
    }

    /// The federation and client a token hash belongs to, or nil.
    public func clientToken(hash: String) async throws -> (federation: FederationID, client: ClientID)? {
        try await reader.read { connection in
            let statement = try connection.statement("SELECT federation, client FROM client_tokens WHERE token_hash = ?1")
            try statement.bind(.text(hash))
            return try statement.step() ? (FederationID(stored: statement.text(0)), ClientID(stored: statement.text(1))) : nil
        }
    }
}
