/// An error with an HTTP status: thrown by the server for protocol violations and limits, by
/// request bodies (too large, timed out, malformed), and usable by handlers.
public struct HTTPServerError: Error, Sendable, Equatable, CustomStringConvertible {
    public let status: HTTPStatus
    public let message: String
    /// Extra response headers the status calls for (`Allow` on 405).
    public let headers: [String: String]

    public init(_ status: HTTPStatus, _ message: String, headers: [String: String] = [:]) {
        self.status = status
        self.message = message
        self.headers = headers
    }

    public var description: String { "\(status): \(message)" }
}
