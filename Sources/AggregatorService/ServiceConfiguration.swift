import HTTPServer

/// Everything `lora-aggregator serve` can be told; each has a safe default.
public struct ServiceConfiguration: Sendable {
    /// Where all state lives: a SQLite file's path, or a `postgresql://` URI, which any number of
    /// server processes may share.
    public var database = "./lora-aggregator.sqlite"
    /// PostgreSQL connections each process opens for reads (plus one for writes).
    public var databaseConnections = 8
    /// Caps both an upload's body as sent and its decompressed size.
    public var maxUploadBytes = 1 << 30
    /// Memory kept for recently computed aggregates (least recently used out first).
    public var aggregateCacheBytes = 1 << 30
    /// With a token, every `/v1` request needs `Authorization: Bearer` (the admin token or a client
    /// token the admin issued); without one, `/v1` is open.
    public var adminToken: String?
    /// Allows serving without an admin token on an address other hosts can reach.
    public var insecureNoAuth = false
    /// Write one access-log line per request to standard error.
    public var accessLog = true
    /// Listener, limits and timeouts of the HTTP layer.
    public var http = HTTPServerConfiguration()

    public init() {}

    /// The database as logs may show it: a password (a URI's `user:password@`, or `password=`)
    /// replaced by `***`.
    public var databaseForLogs: String {
        database.replacing(/(:\/\/[^:@\/]*:)[^@]*@/) { "\($0.output.1)***@" }.replacing(/(password=)[^&\s]*/) { "\($0.output.1)***" }
    }
}
