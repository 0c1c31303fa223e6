/// Failures of the store, with codes the service maps to HTTP statuses.
public struct StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        private init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The round is sealed: no uploads or deletes.
        public static let roundSealed = Code("round_sealed")
        /// The disk (or the database's quota) is full; nothing was written.
        public static let storageFull = Code("storage_full")
        /// The database cannot be written (read-only file or directory).
        public static let readOnly = Code("read_only")
        /// The database is locked by another process for longer than the busy timeout.
        public static let busy = Code("busy")
        /// The database server cannot be reached (down, restarting, or the network); it is tried
        /// again with the next request.
        public static let unavailable = Code("database_unavailable")
        /// A value is larger than the database can hold (PostgreSQL: 1 GiB per tensor).
        public static let tooLarge = Code("too_large_for_database")
        /// Any other database failure.
        public static let database = Code("database_error")
    }

    public let code: Code
    /// Safe to show a client: never SQL, a file path or the database's internals.
    public let message: String
    /// What the database said, for the server's own log only.
    public let detail: String

    init(_ code: Code, _ message: String, detail: String = "") {
        self.code = code
        self.message = message
        self.detail = detail
    }

    public var description: String { detail.isEmpty ? "\(code): \(message)" : "\(code): \(message) (\(detail))" }
}
