/// What an `Identifier` names; `name` is also its path parameter and the word in messages about it.
public protocol IdentifierKind {
    static var name: String { get }
}

public enum FederationKind: IdentifierKind { public static let name = "federation" }
public enum ClientKind: IdentifierKind { public static let name = "client" }

public typealias FederationID = Identifier<FederationKind>
public typealias ClientID = Identifier<ClientKind>

/// A federation or client id (encoded as its text): `[A-Za-z0-9._-]{1,64}`, checked once where it
/// enters (the service's path parameters), so nothing past that point handles an unchecked string.
public struct Identifier<Kind: IdentifierKind>: RawRepresentable, Hashable, Sendable, Encodable, CustomStringConvertible, ExpressibleByStringLiteral {
    public let rawValue: String

    /// Nil unless `text` is 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'.
    public init?(rawValue text: String) {
        let allowed = text.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
        guard allowed, (1...64).contains(text.utf8.count) else { return nil }
        rawValue = text
    }

    /// An id read back from the database, which holds only ids that were checked on the way in.
    init(stored rawValue: String) { self.rawValue = rawValue }

    /// A literal id in code (tests, tools); an invalid one is a programming error.
    public init(stringLiteral text: String) {
        guard let id = Self(rawValue: text) else { preconditionFailure("'\(text)' is not a valid \(Kind.name) id") }
        self = id
    }

    public var description: String { rawValue }
}

/// A round of a federation (encoded as its number): a whole number from 0 to 2^53 - 1, which a
/// JSON number holds exactly.
public struct RoundNumber: RawRepresentable, Hashable, Sendable, Encodable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public let rawValue: Int64

    /// Nil out of range.
    public init?(rawValue: Int64) {
        guard (0..<(1 << 53)).contains(rawValue) else { return nil }
        self.rawValue = rawValue
    }

    /// Nil unless `text` is decimal digits only (no sign, at most 16) for a round in range.
    public init?(_ text: String) {
        guard !text.isEmpty, text.utf8.count <= 16, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let value = Int64(text) else { return nil }
        self.init(rawValue: value)
    }

    /// A round read back from the database, which holds only rounds that were checked on the way in.
    init(stored rawValue: Int64) { self.rawValue = rawValue }

    /// A literal round in code (tests, tools); one out of range is a programming error.
    public init(integerLiteral value: Int64) {
        guard let round = Self(rawValue: value) else { preconditionFailure("round \(value) is out of range") }
        self = round
    }

    public var description: String { String(rawValue) }
}
