/// A response: status, headers and a body held in memory or produced as a stream. The server adds
/// `Date`, `Content-Length` or `Transfer-Encoding`, and `Connection` itself.
public struct HTTPResponse: Sendable {
    public enum Body: Sendable {
        case bytes([UInt8])
        /// Produced by `write`, which the server runs after sending the head. With a `length` the
        /// response has a Content-Length (and `write` must produce exactly that many bytes);
        /// without one it is sent chunked (or, to HTTP/1.0 clients, delimited by closing).
        case stream(length: Int?, write: @Sendable (HTTPBodyWriter) async throws -> Void)
    }

    public var status: HTTPStatus
    public var headers: HTTPHeaders
    public var body: Body

    public init(status: HTTPStatus, headers: HTTPHeaders = [:], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = .bytes(body)
    }

    public init(status: HTTPStatus, headers: HTTPHeaders = [:], streamLength: Int?, write: @escaping @Sendable (HTTPBodyWriter) async throws -> Void) {
        self.status = status
        self.headers = headers
        self.body = .stream(length: streamLength, write: write)
    }
}

/// Hands bytes of a streamed response body to the connection; `write` returns once the bytes are
/// queued and the connection's send buffer has room again, so a slow reader slows the producer.
public struct HTTPBodyWriter: Sendable {
    let send: @Sendable ([UInt8]) async throws -> Void

    public func write(_ bytes: [UInt8]) async throws {
        guard !bytes.isEmpty else { return }
        try await send(bytes)
    }
}
