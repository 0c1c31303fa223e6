/// What the server knows of an answered request.
public struct CompletedRequest: Sendable {
    public let method: String
    /// The raw path (still percent-encoded).
    public let path: String
    /// The matched route's pattern, or nil when no route matched (404, 405, protocol errors).
    public let route: String?
    public let status: Int
    /// Request body bytes as received (after chunked decoding, before any content coding).
    public let requestBodyBytes: Int
    public let responseBodyBytes: Int
    public let duration: Duration

    /// `METHOD PATH STATUS BYTES DURATIONms`.
    public var accessLogLine: String {
        AccessLogLine.format(
            method: method, path: path[...], status: status, bytes: responseBodyBytes,
            milliseconds: Double(duration / .microseconds(1)) / 1000)
    }
}

/// The access log's line format: `METHOD PATH STATUS BYTES MILLISECONDS`. Method and path come from
/// a parsed head, which admits only visible ASCII, so a line can never be split or forged; anything
/// else is escaped anyway as `\xNN`.
enum AccessLogLine {
    static func format(method: String, path: Substring, status: Int, bytes: Int, milliseconds: Double) -> String {
        let rounded = (milliseconds * 1000).rounded() / 1000
        return "\(escaped(method[...])) \(escaped(path)) \(status) \(bytes) \(rounded)ms"
    }

    static func escaped(_ text: Substring) -> String {
        guard text.utf8.contains(where: { $0 <= 0x20 || $0 >= 0x7F || $0 == UInt8(ascii: "\\") }) else { return String(text) }
        var result = ""
        for byte in text.utf8 {
            if byte <= 0x20 || byte >= 0x7F || byte == UInt8(ascii: "\\") {
                let hex = String(byte, radix: 16)
                result += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            } else {
                result.unicodeScalars.append(Unicode.Scalar(byte))
            }
        }
        return result
    }
}
