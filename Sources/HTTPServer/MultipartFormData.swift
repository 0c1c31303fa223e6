import CLinux

/// One part of a `multipart/form-data` body (RFC 7578).
public struct MultipartPart: Sendable {
    /// The `name` of its `Content-Disposition: form-data`.
    public let name: String
    public let filename: String?
    public let contentType: String?
    public let body: [UInt8]
}

/// Limits on a `multipart/form-data` body, so that a hostile one costs bounded work and memory.
public struct MultipartLimits: Sendable {
    public var maxParts = 8
    /// The header block of one part.
    public var maxPartHeaderBytes = 8 * 1024
    /// Per part name; parts not named here are refused (a part nobody reads is a mistake to report).
    public var maxPartBytes: [String: Int]

    public init(maxPartBytes: [String: Int]) { self.maxPartBytes = maxPartBytes }
}

/// A streaming, strict `multipart/form-data` reader (RFC 7578 over RFC 2046 §5.1): bytes go in as
/// they arrive, in chunks of any size; parts come out whole. Every deviation is a 400 naming it:
/// a missing or malformed boundary, a part without `Content-Disposition: form-data; name=…`, a
/// repeated or unexpected part name, a header block over its limit, or a body that ends before the
/// close delimiter; a part over its limit is a 413. A preamble and an epilogue are ignored, as RFC 2046 says.
public struct MultipartFormDataReader {
    private enum State {
        /// Before the first delimiter (a preamble may precede it).
        case preamble
        /// Just after a delimiter: `--` (the close delimiter) or optional whitespace then CRLF.
        case afterDelimiter
        case partHeaders
        case partBody(name: String, filename: String?, contentType: String?, limit: Int)
        /// After the close delimiter: the epilogue, ignored.
        case done
    }

    private let limits: MultipartLimits
    /// `CRLF--boundary`: what ends each part's body.
    private let delimiter: [UInt8]
    private var state = State.preamble
    private var buffer: [UInt8] = []
    private var partBody: [UInt8] = []
    public private(set) var parts: [MultipartPart] = []

    /// Reads the boundary from a `Content-Type: multipart/form-data; boundary=…` value.
    public init(contentType: String, limits: MultipartLimits) throws(HTTPServerError) {
        guard let boundary = Self.boundary(in: contentType) else {
            throw HTTPServerError(.badRequest, "a multipart/form-data body needs a boundary parameter of 1 to 70 characters (RFC 2046 §5.1.1)")
        }
        self.limits = limits
        delimiter = Array("\r\n--\(boundary)".utf8)
    }

    /// The `boundary` parameter of a `multipart/form-data` media type, or nil.
    static func boundary(in contentType: String) -> String? {
        let pieces = contentType.split(separator: ";").map { $0.trimmingASCIIWhitespace() }
        guard pieces.first?.lowercased() == "multipart/form-data" else { return nil }
        for parameter in pieces.dropFirst() {
            let pair = parameter.split(separator: "=", maxSplits: 1)
            guard pair.count == 2, pair[0].trimmingASCIIWhitespace().lowercased() == "boundary" else { continue }
            var value = pair[1].trimmingASCIIWhitespace()
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            let allowed = Set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? ".utf8)
            guard (1...70).contains(value.utf8.count), value.utf8.allSatisfy(allowed.contains), value.utf8.last != UInt8(ascii: " ") else { return nil }
            return value
        }
        return nil
    }

    /// Takes the next bytes of the body.
    public mutating func append(_ bytes: [UInt8]) throws(HTTPServerError) {
        // `withUnsafeBytes` rethrows untyped errors, so the typed one travels as a Result.
        try bytes.withUnsafeBytes { raw in Result { () throws(HTTPServerError) in try append(raw) } }.get()
    }

    /// Takes the next bytes of the body. Inside a part, bytes that hold no delimiter go straight to
    /// the part's body: each byte of a large part is copied once and scanned once.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) throws(HTTPServerError) {
        if case .done = state { return }
        if case .partBody(let name, _, _, let limit) = state, bytes.count >= delimiter.count, !holdsDelimiter(before: bytes) {
            // No delimiter starts in `buffer` (held back, shorter than one) or in `bytes`, so all but
            // the last bytes, which could begin one, are the part's.
            let kept = bytes.count - (delimiter.count - 1)
            partBody += buffer
            partBody.append(contiguous: UnsafeRawBufferPointer(rebasing: bytes[0..<kept]))
            buffer = Array(bytes[kept...])
            guard partBody.count <= limit else { throw Self.partTooLarge(name, limit) }
            return
        }
        buffer.append(contiguous: bytes)
        try advance()
    }

    /// Whether a delimiter starts in `buffer` followed by `bytes`, or in `bytes` itself.
    private func holdsDelimiter(before bytes: UnsafeRawBufferPointer) -> Bool {
        let junction = buffer + bytes.prefix(delimiter.count - 1)
        guard Self.find(delimiter, in: junction) == nil else { return true }
        return Self.find(delimiter, in: bytes) != nil
    }

    /// The body has ended: returns the parts, or throws if it ended before the close delimiter.
    public mutating func finish() throws(HTTPServerError) -> [MultipartPart] {
        guard case .done = state else { throw Self.error("the multipart body ended before its close delimiter") }
        return parts
    }

    private static func error(_ message: String) -> HTTPServerError { HTTPServerError(.badRequest, message) }

    private static func partTooLarge(_ name: String, _ limit: Int) -> HTTPServerError {
        HTTPServerError(.contentTooLarge, "the multipart part \"\(name)\" exceeds \(limit) bytes")
    }

    private mutating func advance() throws(HTTPServerError) {
        while true {
            switch state {
            case .done:
                buffer = []
                return
            case .preamble:
                // The first delimiter may open the body without the CRLF before it.
                let opening = Array(delimiter.dropFirst(2))
                if buffer.starts(with: opening) {
                    buffer.removeFirst(opening.count)
                } else if let found = Self.find(delimiter, in: buffer) {
                    buffer.removeFirst(found + delimiter.count)
                } else {
                    // Not found yet: wait for more, but a preamble is bounded like a header block.
                    guard buffer.count <= limits.maxPartHeaderBytes else { throw Self.error("no multipart boundary delimiter found") }
                    return
                }
                state = .afterDelimiter
            case .afterDelimiter:
                guard buffer.count >= 2 else { return }
                if buffer[0] == UInt8(ascii: "-") && buffer[1] == UInt8(ascii: "-") {
                    state = .done
                    continue
                }
                var index = 0
                while index < buffer.count, buffer[index] == UInt8(ascii: " ") || buffer[index] == UInt8(ascii: "\t") { index += 1 }
                guard index + 2 <= buffer.count else {
                    guard index < 256 else { throw Self.error("a multipart delimiter line is malformed") }
                    return
                }
                guard buffer[index] == 0x0D, buffer[index + 1] == 0x0A else { throw Self.error("a multipart delimiter is not followed by CRLF") }
                buffer.removeFirst(index + 2)
                guard parts.count < limits.maxParts else { throw Self.error("the multipart body has more than \(limits.maxParts) parts") }
                state = .partHeaders
            case .partHeaders:
                guard let end = Self.find(Array("\r\n\r\n".utf8), in: buffer, upTo: limits.maxPartHeaderBytes + 4) else {
                    guard buffer.count <= limits.maxPartHeaderBytes + 4 else {
                        throw Self.error("a multipart part's headers exceed \(limits.maxPartHeaderBytes) bytes")
                    }
                    // A part with no header fields at all ends its (empty) header block at once.
                    if buffer.starts(with: [0x0D, 0x0A]) { throw Self.error("a multipart part has no Content-Disposition") }
                    return
                }
                let head = Array(buffer[0..<end])
                buffer.removeFirst(end + 4)
                state = try partState(headers: head)
                partBody = []
            case .partBody(let name, let filename, let contentType, let limit):
                if let found = Self.find(delimiter, in: buffer) {
                    partBody += buffer[0..<found]
                    buffer.removeFirst(found + delimiter.count)
                    guard partBody.count <= limit else { throw Self.partTooLarge(name, limit) }
                    parts.append(MultipartPart(name: name, filename: filename, contentType: contentType, body: partBody))
                    partBody = []
                    state = .afterDelimiter
                } else {
                    // All but the bytes that could start a delimiter are this part's.
                    let safe = max(0, buffer.count - (delimiter.count - 1))
                    partBody += buffer[0..<safe]
                    buffer.removeFirst(safe)
                    guard partBody.count <= limit else { throw Self.partTooLarge(name, limit) }
                    return
                }
            }
        }
    }

    /// Reads one part's header block: its name must be expected and new.
    private func partState(headers block: [UInt8]) throws(HTTPServerError) -> State {
        guard let text = String(validating: block, as: UTF8.self) else { throw Self.error("a multipart part's headers are not UTF-8") }
        var disposition: String?
        var contentType: String?
        for line in text.split(separator: "\r\n", omittingEmptySubsequences: false) {
            guard let colon = line.firstIndex(of: ":"), !line.isEmpty else { throw Self.error("a multipart part has a malformed header line") }
            let field = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingASCIIWhitespace()
            guard !field.isEmpty, !field.contains(" "), !line.contains("\r"), !line.contains("\n") else {
                throw Self.error("a multipart part has a malformed header line")
            }
            switch field {
            case "content-disposition":
                guard disposition == nil else { throw Self.error("a multipart part has two Content-Disposition fields") }
                disposition = value
            case "content-type":
                contentType = value
            default:
                break  // Content-Transfer-Encoding and others are ignored, as RFC 7578 §4.7 allows
            }
        }
        guard let disposition else { throw Self.error("a multipart part has no Content-Disposition") }
        let parameters = Self.parameters(of: disposition)
        guard parameters.type == "form-data", let name = parameters.values["name"] else {
            throw Self.error("a multipart part's Content-Disposition must be form-data with a name")
        }
        guard let limit = limits.maxPartBytes[name] else {
            throw Self.error(
                "unexpected multipart part \"\(name)\"; expected \(limits.maxPartBytes.keys.sorted().map { "\"\($0)\"" }.joined(separator: " and "))")
        }
        guard !parts.contains(where: { $0.name == name }) else { throw Self.error("the multipart part \"\(name)\" appears twice") }
        return .partBody(name: name, filename: parameters.values["filename"], contentType: contentType, limit: limit)
    }

    /// `form-data; name="x"; filename="y"` → ("form-data", ["name": "x", "filename": "y"]).
    private static func parameters(of value: String) -> (type: String, values: [String: String]) {
        var values: [String: String] = [:]
        var pieces = value[...]
        let type = pieces.prefix { $0 != ";" }.trimmingASCIIWhitespace().lowercased()
        pieces = pieces.drop { $0 != ";" }
        while pieces.first == ";" {
            pieces = pieces.dropFirst()
            let key = pieces.prefix { $0 != "=" && $0 != ";" }.trimmingASCIIWhitespace().lowercased()
            pieces = pieces.drop { $0 != "=" && $0 != ";" }
            guard pieces.first == "=" else { continue }
            pieces = pieces.dropFirst().drop { $0 == " " || $0 == "\t" }
            var parsed = ""
            if pieces.first == "\"" {
                pieces = pieces.dropFirst()
                while let character = pieces.first, character != "\"" {
                    if character == "\\", !pieces.dropFirst().isEmpty { pieces = pieces.dropFirst() }
                    parsed.append(pieces.first!)
                    pieces = pieces.dropFirst()
                }
                pieces = pieces.dropFirst()
                pieces = pieces.drop { $0 != ";" }
            } else {
                parsed = pieces.prefix { $0 != ";" }.trimmingASCIIWhitespace()
                pieces = pieces.drop { $0 != ";" }
            }
            values[key] = parsed
        }
        return (type, values)
    }

    /// The offset of the first `needle` in `haystack` (within its first `limit` bytes), or nil.
    private static func find(_ needle: [UInt8], in haystack: [UInt8], upTo limit: Int = .max) -> Int? {
        haystack.withUnsafeBytes { find(needle, in: UnsafeRawBufferPointer(rebasing: $0.prefix(limit))) }
    }

    private static func find(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        return needle.withUnsafeBytes { pattern in
            guard let found = clinux_memmem(haystack.baseAddress, haystack.count, pattern.baseAddress, pattern.count) else { return nil }
            return haystack.baseAddress!.distance(to: UnsafeRawPointer(found))
        }
    }
}

extension [UInt8] {
    /// Appends raw bytes with one copy (a raw buffer's generic `append(contentsOf:)` may go byte by byte).
    mutating func append(contiguous bytes: UnsafeRawBufferPointer) {
        bytes.withMemoryRebound(to: UInt8.self) { append(contentsOf: $0) }
    }
}
