/// Incremental decoder of the chunked transfer coding (RFC 9112 §7.1). Chunk extensions are skipped
/// and trailer fields read and dropped; sizes are refused past `maxBodyBytes` before any data of the
/// chunk is accepted, and every framing error is a 400.
public struct ChunkedDecoder {
    private enum State {
        case size(value: Int, digits: Int)
        case sizeExtension(value: Int, length: Int)
        case sizeLineFeed(value: Int)
        case data(remaining: Int)
        case dataCarriageReturn
        case dataLineFeed
        case trailerLine(length: Int)
        case trailerLineFeed(lineLength: Int)
        case done
    }

    private var state = State.size(value: 0, digits: 0)
    private var decodedBytes = 0
    private var trailerBytes = 0
    let maxBodyBytes: Int
    let maxTrailerBytes: Int

    public init(maxBodyBytes: Int, maxTrailerBytes: Int) {
        self.maxBodyBytes = maxBodyBytes
        self.maxTrailerBytes = maxTrailerBytes
    }

    public var isDone: Bool { if case .done = state { true } else { false } }

    private static let maxExtensionBytes = 4096

    /// Consumes bytes of `input`, appending chunk data to `output`; returns how many bytes were
    /// consumed (fewer than given only once the body is done).
    public mutating func decode(_ input: UnsafeRawBufferPointer, into output: inout [UInt8]) throws(HTTPServerError) -> Int {
        var index = 0
        while index < input.count {
            let byte = input[index]
            switch state {
            case .done:
                return index
            case .size(let value, let digits):
                if let digit = PercentDecoding.hexValue(byte) {
                    guard digits < 15 else { throw HTTPServerError(.badRequest, "a chunk size has too many digits") }
                    state = .size(value: value << 4 | Int(digit), digits: digits + 1)
                } else {
                    guard digits > 0 else { throw HTTPServerError(.badRequest, "a chunk size is missing") }
                    guard value <= maxBodyBytes - decodedBytes else {
                        throw HTTPServerError(.contentTooLarge, "the request body exceeds \(maxBodyBytes) bytes")
                    }
                    switch byte {
                    case UInt8(ascii: ";"): state = .sizeExtension(value: value, length: 0)
                    case 0x0D: state = .sizeLineFeed(value: value)
                    default: throw HTTPServerError(.badRequest, "a chunk size is followed by an unexpected character")
                    }
                }
                index += 1
            case .sizeExtension(let value, let length):
                if byte == 0x0D {
                    state = .sizeLineFeed(value: value)
                } else {
                    guard byte == 0x09 || (byte >= 0x20 && byte != 0x7F), length < Self.maxExtensionBytes else {
                        throw HTTPServerError(.badRequest, "a chunk extension is malformed or too long")
                    }
                    state = .sizeExtension(value: value, length: length + 1)
                }
                index += 1
            case .sizeLineFeed(let value):
                guard byte == 0x0A else { throw HTTPServerError(.badRequest, "a chunk size line does not end in CRLF") }
                state = value == 0 ? .trailerLine(length: 0) : .data(remaining: value)
                index += 1
            case .data(let remaining):
                let take = min(remaining, input.count - index)
                output.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[index..<(index + take)]))
                decodedBytes += take
                index += take
                state = take == remaining ? .dataCarriageReturn : .data(remaining: remaining - take)
            case .dataCarriageReturn:
                guard byte == 0x0D else { throw HTTPServerError(.badRequest, "chunk data is longer than its size") }
                state = .dataLineFeed
                index += 1
            case .dataLineFeed:
                guard byte == 0x0A else { throw HTTPServerError(.badRequest, "chunk data does not end in CRLF") }
                state = .size(value: 0, digits: 0)
                index += 1
            case .trailerLine(let length):
                trailerBytes += 1
                guard trailerBytes <= maxTrailerBytes else {
                    throw HTTPServerError(.requestHeaderFieldsTooLarge, "the trailer section exceeds \(maxTrailerBytes) bytes")
                }
                if byte == 0x0D {
                    state = .trailerLineFeed(lineLength: length)
                } else {
                    guard byte == 0x09 || (byte >= 0x20 && byte != 0x7F) || byte >= 0x80 else {
                        throw HTTPServerError(.badRequest, "a trailer field holds a control character")
                    }
                    state = .trailerLine(length: length + 1)
                }
                index += 1
            case .trailerLineFeed(let lineLength):
                guard byte == 0x0A else { throw HTTPServerError(.badRequest, "a trailer line does not end in CRLF") }
                state = lineLength == 0 ? .done : .trailerLine(length: 0)
                index += 1
            }
        }
        return index
    }
}
