extension AdapterStore {
    /// Records a token for the client, by its hash only.
    public func addClientToken(hash: String, federation: String, client: String) async throws {
        try await writer.write { connection in
            try connection.statement("INSERT INTO client_tokens (token_hash, federation, client, created_at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
                .bind(.text(hash), .text(federation), .text(client)).run()
        }
    }

    /// Revokes every token of the client; returns how many there were.
    @discardableResult
    public func revokeClientTokens(federation: String, client: String) async throws -> Int {
        try await writer.write { connection in
            try connection.statement("DELETE FROM client_tokens WHERE federation = ?1 AND client = ?2").bind(.text(federation), .text(client)).run()
            return connection.changes
        }
    }

    /// The federation and client a token hash belongs to, or nil.
    public func clientToken(hash: String) async throws -> (federation: String, client: String)? {
        try await reader.read { connection in
            let statement = try connection.statement("SELECT federation, client FROM client_tokens WHERE token_hash = ?1")
            try statement.bind(.text(hash))
            return try statement.step() ? (statement.text(0), statement.text(1)) : nil
        }
    }
}
