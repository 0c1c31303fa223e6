import HTTPServer

/// Everything `lora-aggregator serve` can be told; each has a safe default.
public struct ServiceConfiguration: Sendable {
    /// The SQLite file holding all state.
    public var databasePath = "./lora-aggregator.sqlite"
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
}
