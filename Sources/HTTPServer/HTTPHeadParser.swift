#if canImport(Glibc)
    import Glibc
#endif

/// Limits on a request head; exceeding them gets 414 or 431.
public struct HTTPHeadLimits: Sendable {
    public var maxRequestLineBytes: Int
    public var maxHeaderBytes: Int
    public var maxHeaderCount: Int

    public init(maxRequestLineBytes: Int = 8 * 1024, maxHeaderBytes: Int = 64 * 1024, maxHeaderCount: Int = 100) {
        self.maxRequestLineBytes = maxRequestLineBytes
        self.maxHeaderBytes = maxHeaderBytes
        self.maxHeaderCount = maxHeaderCount
    }
}

/// A strict, incremental parser of HTTP/1.x request heads (RFC 9112 §2–5). It accepts only CRLF
/// line endings, single spaces in the request line, token field names with no space before the
/// colon, and field values without control characters; obs-fold, bare CR and bare LF are errors.
public enum HTTPHeadParser {
    public enum Result {
        /// More bytes are needed.
        case incomplete
        /// A complete head that occupies the first `length` bytes.
        case complete(HTTPRequest, length: Int)
    }

    /// How many empty lines before a request line are ignored (RFC 9112 §2.2 robustness).
    static let maxLeadingEmptyLines = 8

    public static func parse(_ bytes: UnsafeRawBufferPointer, limits: HTTPHeadLimits) throws(HTTPServerError) -> Result {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return .incomplete }
        var reader = LineReader(base: base, count: bytes.count)

        var requestLine: Range<Int>?
        for _ in 0...maxLeadingEmptyLines {
            guard
                let line = try reader.nextLine(
                    limit: limits.maxRequestLineBytes, overLimit: HTTPServerError(.uriTooLong, "the request line exceeds \(limits.maxRequestLineBytes) bytes"))
            else {
                return .incomplete
            }
            if !line.isEmpty {
                requestLine = line
                break
            }
        }
        guard let requestLine else { throw HTTPServerError(.badRequest, "too many empty lines before the request line") }
        let (method, target, version) = try parseRequestLine(bytes, requestLine)

        var headers = HTTPHeaders()
        let headerLimitError = HTTPServerError(.requestHeaderFieldsTooLarge, "the header section exceeds \(limits.maxHeaderBytes) bytes")
        while true {
            let remaining = limits.maxHeaderBytes - (reader.position - requestLine.upperBound)
            guard remaining > 0 else { throw headerLimitError }
            guard let line = try reader.nextLine(limit: remaining, overLimit: headerLimitError) else { return .incomplete }
            if line.isEmpty { break }
            guard headers.count < limits.maxHeaderCount else {
                throw HTTPServerError(.requestHeaderFieldsTooLarge, "more than \(limits.maxHeaderCount) header fields")
            }
            let (name, value) = try parseField(bytes, line)
            headers.add(name, value)
        }
        return .complete(HTTPRequest(method: method, target: target, version: version, headers: headers), length: reader.position)
    }

    private static func parseRequestLine(_ bytes: UnsafeRawBufferPointer, _ line: Range<Int>) throws(HTTPServerError) -> (String, String, HTTPVersion) {
        let parts = bytes[line].split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw HTTPServerError(.badRequest, "the request line must be 'method target version' separated by single spaces")
        }
        guard parts[0].allSatisfy(isTokenCharacter) else { throw HTTPServerError(.badRequest, "the method is not a token") }
        guard parts[1].allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw HTTPServerError(.badRequest, "the request target holds a space, control or non-ASCII character")
        }
        let target = String(decoding: parts[1], as: UTF8.self)
        guard target.hasPrefix("/") || target.hasPrefix("http://") || target.hasPrefix("https://") || target == "*" else {
            throw HTTPServerError(.badRequest, "the request target must be a path (origin-form) or an absolute URI")
        }
        let version: HTTPVersion
        switch Array(parts[2]) {
        case Array("HTTP/1.1".utf8): version = .http1_1
        case Array("HTTP/1.0".utf8): version = .http1_0
        case let other
        where other.count == 8 && other.starts(with: Array("HTTP/".utf8)) && isDigit(other[5]) && other[6] == UInt8(ascii: ".") && isDigit(other[7]):
            throw HTTPServerError(.httpVersionNotSupported, "only HTTP/1.0 and HTTP/1.1 are supported")
        default:
            throw HTTPServerError(.badRequest, "the request line does not end in an HTTP version")
        }
        return (String(decoding: parts[0], as: UTF8.self), target, version)
    }

    private static func parseField(_ bytes: UnsafeRawBufferPointer, _ line: Range<Int>) throws(HTTPServerError) -> (String, String) {
        let first = bytes[line.lowerBound]
        guard first != UInt8(ascii: " ") && first != UInt8(ascii: "\t") else {
            throw HTTPServerError(.badRequest, "obsolete line folding is not accepted")
        }
        guard let colon = bytes[line].firstIndex(of: UInt8(ascii: ":")) else {
            throw HTTPServerError(.badRequest, "a header line has no colon")
        }
        let name = bytes[line.lowerBound..<colon]
        guard !name.isEmpty, name.allSatisfy(isTokenCharacter) else {
            throw HTTPServerError(.badRequest, "a header field name is empty, holds whitespace before the colon, or is not a token")
        }
        var valueStart = colon + 1
        var valueEnd = line.upperBound
        while valueStart < valueEnd, isWhitespace(bytes[valueStart]) { valueStart += 1 }
        while valueEnd > valueStart, isWhitespace(bytes[valueEnd - 1]) { valueEnd -= 1 }
        let value = bytes[valueStart..<valueEnd]
        guard value.allSatisfy({ $0 == 0x09 || ($0 >= 0x20 && $0 != 0x7F) }) else {
            throw HTTPServerError(.badRequest, "a header field value holds a control character")
        }
        return (String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
    }

    static func isTokenCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
            UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
            UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            true
        default: false
        }
    }

    static func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }
    static func isWhitespace(_ byte: UInt8) -> Bool { byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }
}

/// Finds CRLF-terminated lines, refusing bare CR and bare LF.
struct LineReader {
    let base: UnsafeRawPointer
    let count: Int
    var position = 0

    /// The next line (without its CRLF), nil if no complete line is buffered yet.
    mutating func nextLine(limit: Int, overLimit: HTTPServerError) throws(HTTPServerError) -> Range<Int>? {
        let available = count - position
        let searchLength = min(available, limit + 1)
        guard let found = memchr(base + position, Int32(UInt8(ascii: "\n")), searchLength) else {
            if available > limit { throw overLimit }
            if let carriageReturn = memchr(base + position, 0x0D, searchLength),
                carriageReturn - UnsafeMutableRawPointer(mutating: base) < count - 1
            {
                throw HTTPServerError(.badRequest, "a bare CR in the request head")
            }
            return nil
        }
        let lineFeed = UnsafeRawPointer(found) - base
        guard lineFeed > position, base.load(fromByteOffset: lineFeed - 1, as: UInt8.self) == 0x0D else {
            throw HTTPServerError(.badRequest, "a line ends in a bare LF")
        }
        let line = position..<(lineFeed - 1)
        guard line.count <= limit else { throw overLimit }
        if memchr(base + line.lowerBound, 0x0D, line.count) != nil {
            throw HTTPServerError(.badRequest, "a bare CR in the request head")
        }
        position = lineFeed + 1
        return line
    }
}
