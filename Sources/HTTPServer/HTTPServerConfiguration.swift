/// Everything the server can be told, with safe defaults.
public struct HTTPServerConfiguration: Sendable {
    /// Address to listen on: an IPv4 or IPv6 literal or a host name (the first address it resolves to).
    public var host: String = "127.0.0.1"
    /// 0 picks a free port; `HTTPServer.start()` returns the one bound.
    public var port: Int = 8080
    public var backlog: Int32 = 511
    /// Past this many open connections the server stops accepting; new clients wait in the listen
    /// backlog (and past that, the kernel's SYN handling) until a connection closes.
    public var maxConnections: Int = 1024
    public var headLimits = HTTPHeadLimits()
    /// From the first byte of a request head to its last (slowloris defence); the connection is closed.
    public var headerTimeout: Duration = .seconds(10)
    /// How long a keep-alive connection may wait for its next request.
    public var keepAliveTimeout: Duration = .seconds(60)
    /// How long a request body may go without new bytes while the handler waits for them (408).
    public var bodyIdleTimeout: Duration = .seconds(30)
    /// How long a response write may make no progress before the connection is dropped.
    public var writeTimeout: Duration = .seconds(30)
    /// How long shutdown waits for requests in flight before closing their connections.
    public var shutdownGracePeriod: Duration = .seconds(10)
    public var lingeringClose = LingeringClose()
    /// Called once per answered request, on the event loop (keep it quick): the access log and
    /// metrics hang off it. `CompletedRequest.accessLogLine` is the formatted log line.
    public var onRequestCompleted: (@Sendable (CompletedRequest) -> Void)?
    /// Turns an error (from a handler, a request body, or the server's own checks) into a response.
    /// The default answers `HTTPServerError`s with their status and a plain-text message, and
    /// anything else with 500.
    public var errorResponder: @Sendable (any Error) -> HTTPResponse = HTTPServerConfiguration.plainTextError

    public init() {}

    public static func plainTextError(_ error: any Error) -> HTTPResponse {
        guard let error = error as? HTTPServerError else {
            return HTTPResponse(
                status: .internalServerError, headers: ["Content-Type": "text/plain; charset=utf-8"], body: Array("internal server error\n".utf8))
        }
        var headers: HTTPHeaders = ["Content-Type": "text/plain; charset=utf-8"]
        for (name, value) in error.headers.sorted(by: { $0.key < $1.key }) { headers.add(name, value) }
        return HTTPResponse(status: error.status, headers: headers, body: Array("\(error.message)\n".utf8))
    }
}

/// Bounds on reading and discarding what a client still sends after an early refusal (a 413, 401 or
/// 415 answered before its body was read), as nginx's `lingering_close`: the client then reads the
/// answer instead of a connection reset.
public struct LingeringClose: Sendable {
    /// From the answer to the close, however steadily the client sends (nginx's `lingering_time`).
    public var maxDuration: Duration = .seconds(30)
    /// How long the client may send nothing (nginx's `lingering_timeout`).
    public var idleTimeout: Duration = .seconds(5)
    /// Bytes discarded before closing anyway.
    public var maxBytes: Int = 1 << 30
    /// Connections lingering at once; past this a refused connection closes at once.
    public var maxConnections: Int = 64

    public init() {}
}
