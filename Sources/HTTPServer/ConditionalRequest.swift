/// An entity tag (RFC 9110 §8.8.3): an opaque string in quotes, weak when prefixed by `W/`.
public struct EntityTag: Sendable, Hashable, CustomStringConvertible {
    /// The tag without its quotes.
    public let opaqueTag: String
    public let isWeak: Bool

    /// `opaqueTag` must not contain a double quote.
    public init(_ opaqueTag: String, weak: Bool = false) {
        precondition(!opaqueTag.utf8.contains(UInt8(ascii: "\"")), "an entity tag cannot contain a double quote")
        self.opaqueTag = opaqueTag
        self.isWeak = weak
    }

    /// Parses `"tag"` or `W/"tag"`; nil for anything else.
    public init?(parsing text: some StringProtocol) {
        var rest = Substring(text)
        let weak = rest.hasPrefix("W/")
        if weak { rest = rest.dropFirst(2) }
        guard rest.count >= 2, rest.first == "\"", rest.last == "\"" else { return nil }
        let opaqueTag = rest.dropFirst().dropLast()
        guard !opaqueTag.contains("\"") else { return nil }
        self.init(String(opaqueTag), weak: weak)
    }

    /// The field value: `"tag"` or `W/"tag"`.
    public var description: String { (isWeak ? "W/\"" : "\"") + opaqueTag + "\"" }

    /// Strong comparison (RFC 9110 §8.8.3.2): neither is weak and the opaque tags are equal.
    public func strongMatches(_ other: EntityTag) -> Bool { !isWeak && !other.isWeak && opaqueTag == other.opaqueTag }

    /// Weak comparison: the opaque tags are equal, weak or not.
    public func weakMatches(_ other: EntityTag) -> Bool { opaqueTag == other.opaqueTag }
}

/// The If-None-Match fields of a request (RFC 9110 §13.1.2), read as one list.
public enum IfNoneMatch: Sendable, Equatable {
    /// No field: the condition holds.
    case absent
    /// `*`: any current representation matches.
    case any
    /// The listed tags; elements that are not entity tags are left out.
    case tags([EntityTag])

    public init(_ headers: HTTPHeaders) {
        let elements = headers.values(for: "if-none-match").flatMap(Self.elements)
        if !headers.contains("if-none-match") {
            self = .absent
        } else if elements.contains("*") {
            self = .any
        } else {
            self = .tags(elements.compactMap { EntityTag(parsing: $0) })
        }
    }

    /// True when the field matches `etag` by weak comparison, or is `*`: the condition is false, so
    /// a GET or HEAD is answered 304 Not Modified.
    public func matches(_ etag: EntityTag) -> Bool {
        switch self {
        case .absent: false
        case .any: true
        case .tags(let tags): tags.contains { $0.weakMatches(etag) }
        }
    }

    /// The list's elements, split at commas outside quotes (an opaque tag may hold a comma).
    private static func elements(_ field: String) -> [String] {
        var elements: [String] = []
        var current: [UInt8] = []
        var quoted = false
        for byte in field.utf8 {
            if byte == UInt8(ascii: "\"") { quoted.toggle() }
            if byte == UInt8(ascii: ","), !quoted {
                elements.append(String(decoding: current, as: UTF8.self).trimmingASCIIWhitespace())
                current = []
            } else {
                current.append(byte)
            }
        }
        elements.append(String(decoding: current, as: UTF8.self).trimmingASCIIWhitespace())
        return elements.filter { !$0.isEmpty }
    }
}

extension HTTPRequest {
    /// The request's If-None-Match fields, parsed.
    public var ifNoneMatch: IfNoneMatch { IfNoneMatch(headers) }
}
