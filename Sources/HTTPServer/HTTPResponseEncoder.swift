/// How a response's body goes on the wire (RFC 9112 §6).
enum OutgoingBodyFraming: Equatable {
    /// No body is sent (HEAD, 1xx, 204, 304); `advertisedLength` is the Content-Length a GET would have.
    case omitted(advertisedLength: Int?)
    /// Content-Length, then exactly that many bytes.
    case sized(Int)
    /// Transfer-Encoding: chunked (HTTP/1.1, length unknown).
    case chunked
    /// Length unknown and no chunked coding (HTTP/1.0): the body ends when the connection closes.
    case untilClose

    init(status: HTTPStatus, bodyLength: Int?, requestMethod: String, version: HTTPVersion) {
        if status.forbidsBody {
            self = .omitted(advertisedLength: nil)
        } else if requestMethod == "HEAD" {
            self = .omitted(advertisedLength: bodyLength)
        } else if let bodyLength {
            self = .sized(bodyLength)
        } else {
            self = version == .http1_1 ? .chunked : .untilClose
        }
    }

    /// Whether a request may follow this response on the same connection.
    var allowsKeepAlive: Bool { self != .untilClose }
}

/// Serialises responses: the head with the fields the server owns (framing, Connection, Date), and
/// the chunk framing of streamed bodies. No sockets, so the bytes are tested on their own.
enum HTTPResponseEncoder {
    static let continueResponse = Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)
    static let lastChunk = Array("0\r\n\r\n".utf8)

    /// The head of a response; `headers` lose any field the server sets itself.
    static func head(
        status: HTTPStatus, headers: HTTPHeaders, framing: OutgoingBodyFraming, version: HTTPVersion, keepAlive: Bool, date: String
    ) -> [UInt8] {
        var head = "\(version.text) \(status.code) \(status.reasonPhrase)\r\n"
        for (name, value) in withoutServerHeaders(headers) { head += "\(name): \(value)\r\n" }
        switch framing {
        case .omitted(let length?), .sized(let length): head += "Content-Length: \(length)\r\n"
        case .chunked: head += "Transfer-Encoding: chunked\r\n"
        case .omitted(nil), .untilClose: break
        }
        head += "Date: \(date)\r\n"
        if !keepAlive {
            head += "Connection: close\r\n"
        } else if version == .http1_0 {
            head += "Connection: keep-alive\r\n"
        }
        head += "\r\n"
        return Array(head.utf8)
    }

    /// One piece of a streamed body as it goes on the wire under `framing`.
    static func bodyPiece(_ bytes: [UInt8], framing: OutgoingBodyFraming) -> [[UInt8]] {
        guard framing == .chunked else { return [bytes] }
        guard !bytes.isEmpty else { return [] }  // an empty chunk would be the last one
        return [Array((String(bytes.count, radix: 16) + "\r\n").utf8), bytes, Array("\r\n".utf8)]
    }

    /// `headers` without the fields the server sets itself (framing, connection, date).
    private static func withoutServerHeaders(_ headers: HTTPHeaders) -> HTTPHeaders {
        var headers = headers
        for name in ["Content-Length", "Transfer-Encoding", "Connection", "Date"] { headers.remove(name) }
        return headers
    }
}
