public enum HTTPVersion: Sendable, Hashable {
    // swift-format-ignore: AlwaysUseLowerCamelCase
    // The protocol's own spelling, as SwiftNIO's HTTPVersion has it.
    case http1_0
    // swift-format-ignore: AlwaysUseLowerCamelCase
    case http1_1

    var text: String { self == .http1_0 ? "HTTP/1.0" : "HTTP/1.1" }
}

/// A parsed request head. The body arrives separately, as an `HTTPRequestBody`.
public struct HTTPRequest: Sendable {
    /// The method token exactly as sent (methods are case-sensitive).
    public let method: String
    /// The request-target exactly as sent.
    public let target: String
    public let version: HTTPVersion
    public let headers: HTTPHeaders
    /// Named path segments of the matched route, percent-decoded.
    public internal(set) var pathParameters: [String: String] = [:]

    init(method: String, target: String, version: HTTPVersion, headers: HTTPHeaders) {
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
    }

    /// The path of the target, still percent-encoded (absolute-form targets lose scheme and authority).
    public var path: Substring {
        var rest = target[...]
        for scheme in ["http://", "https://"] where rest.hasPrefix(scheme) {
            let authorityAndPath = rest.dropFirst(scheme.count)
            rest = authorityAndPath.firstIndex(of: "/").map { authorityAndPath[$0...] } ?? "/"
        }
        return rest.firstIndex(of: "?").map { rest[..<$0] } ?? rest
    }

    /// The raw query string after `?`, or nil.
    public var query: Substring? {
        target.firstIndex(of: "?").map { target[target.index(after: $0)...] }
    }

    /// Query parameters percent-decoded (`+` as space), in order; nil if any is malformed.
    public func queryParameters() -> [(name: String, value: String)]? {
        guard let query, !query.isEmpty else { return [] }
        var parameters: [(name: String, value: String)] = []
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = PercentDecoding.decode(parts[0], plusAsSpace: true),
                let value = PercentDecoding.decode(parts.count > 1 ? parts[1] : "", plusAsSpace: true)
            else { return nil }
            parameters.append((name, value))
        }
        return parameters
    }

    /// True when the client asked to keep the connection open after this request.
    var wantsKeepAlive: Bool {
        let options = headers.tokens(for: "connection")
        return version == .http1_1 ? !options.contains("close") : options.contains("keep-alive")
    }
}

enum PercentDecoding {
    /// Decodes `%XX` escapes (and `+` when asked); nil for a malformed escape or invalid UTF-8.
    static func decode(_ text: Substring, plusAsSpace: Bool) -> String? {
        guard text.utf8.contains(where: { $0 == UInt8(ascii: "%") || (plusAsSpace && $0 == UInt8(ascii: "+")) }) else {
            return String(text)
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.utf8.count)
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            switch byte {
            case UInt8(ascii: "%"):
                guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else { return nil }
                bytes.append(high << 4 | low)
            case UInt8(ascii: "+") where plusAsSpace:
                bytes.append(UInt8(ascii: " "))
            default:
                bytes.append(byte)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
