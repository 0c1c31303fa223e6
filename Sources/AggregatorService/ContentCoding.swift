import CZlib

/// The request and response content codings the service speaks (RFC 9110 §8.4.1).
enum ContentCoding: String, CaseIterable {
    case identity
    case gzip
    case deflate

    static let acceptEncodingValue = "gzip, deflate, identity"

    /// zlib's windowBits for this coding: 15 + 16 reads and writes the gzip wrapper; 15 alone the
    /// zlib wrapper, which is what HTTP's "deflate" means.
    var windowBits: Int32 { self == .gzip ? 15 + 16 : 15 }
}

/// Streaming decompression with a cap on the output: input arrives in chunks, and the output is
/// handed on in pieces as it is produced, so a small bomb that would inflate past the cap fails with
/// 413 without the server ever allocating it.
final class Inflater {
    private var stream = z_stream()
    private let limit: Int
    private var produced = 0
    private var scratch = [UInt8](repeating: 0, count: 256 * 1024)
    private(set) var finished = false

    init(coding: ContentCoding, limit: Int) throws(ServiceError) {
        self.limit = limit
        guard czlib_inflate_init2(&stream, coding.windowBits) == Z_OK else {
            throw ServiceError(.internalError, "the decompressor could not start")
        }
    }

    deinit { inflateEnd(&stream) }

    /// Inflates `chunk`, passing each piece of output to `sink` (valid only during the call); throws
    /// 413 past the limit, 400 for a corrupt stream or data after its end, and what `sink` throws.
    func append(_ chunk: [UInt8], to sink: (UnsafeBufferPointer<UInt8>) throws -> Void) throws {
        guard !chunk.isEmpty else { return }
        guard !finished else { throw ServiceError(.badRequest, "data follows the end of the compressed stream") }
        var input = chunk
        let status: Int32 = try input.withUnsafeMutableBufferPointer { source in
            stream.next_in = source.baseAddress
            stream.avail_in = UInt32(source.count)
            return try scratch.withUnsafeMutableBufferPointer { buffer in
                while true {
                    stream.next_out = buffer.baseAddress
                    stream.avail_out = UInt32(buffer.count)
                    let status = inflate(&stream, Z_NO_FLUSH)
                    let count = buffer.count - Int(stream.avail_out)
                    guard status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR else { return status }
                    guard produced + count <= limit else { return Z_MEM_ERROR }
                    produced += count
                    if count > 0 { try sink(UnsafeBufferPointer(rebasing: buffer[0..<count])) }
                    if status == Z_STREAM_END { return stream.avail_in == 0 ? Z_STREAM_END : Z_DATA_ERROR }
                    // All input taken and the output buffer not filled: this chunk is done.
                    if stream.avail_in == 0 && stream.avail_out > 0 { return Z_OK }
                    if status == Z_BUF_ERROR { return Z_OK }
                }
            }
        }
        switch status {
        case Z_OK: break
        case Z_STREAM_END: finished = true
        case Z_MEM_ERROR: throw ServiceError(.contentTooLarge, "the decompressed upload exceeds \(limit) bytes")
        default: throw ServiceError(.badRequest, "the compressed body is corrupt")
        }
    }

    /// Throws 400 when the compressed stream has not ended.
    func finish() throws(ServiceError) {
        guard finished else { throw ServiceError(.badRequest, "the compressed body ends before its stream does") }
    }
}

extension ContentCoding {
    /// `bytes` compressed in this coding (gzip for responses; tests make deflate bodies with it).
    func compress(_ bytes: [UInt8], level: Int32 = Z_BEST_SPEED) -> [UInt8] {
        guard self != .identity else { return bytes }
        var stream = z_stream()
        guard czlib_deflate_init2(&stream, level, windowBits) == Z_OK else { return bytes }
        defer { deflateEnd(&stream) }
        var output = [UInt8](repeating: 0, count: Int(deflateBound(&stream, UInt(bytes.count))) + 32)
        var input = bytes
        let produced: Int = input.withUnsafeMutableBufferPointer { source in
            output.withUnsafeMutableBufferPointer { destination in
                stream.next_in = source.baseAddress
                stream.avail_in = UInt32(source.count)
                stream.next_out = destination.baseAddress
                stream.avail_out = UInt32(destination.count)
                _ = CZlib.deflate(&stream, Z_FINISH)
                return destination.count - Int(stream.avail_out)
            }
        }
        output.removeSubrange(produced...)
        return output
    }
}

/// Request-body decoding as one call, for tools (the fuzzer) outside the service.
public enum ContentDecoding {
    /// `bytes` decoded from `coding` ("gzip" or "deflate"), refusing output past `limit` bytes.
    public static func inflate(_ bytes: [UInt8], coding: String, limit: Int) throws -> [UInt8] {
        guard let coding = ContentCoding(rawValue: coding), coding != .identity else {
            throw ServiceError(.unsupportedMediaType, "content coding '\(coding)' is not supported")
        }
        let inflater = try Inflater(coding: coding, limit: limit)
        var output: [UInt8] = []
        try inflater.append(bytes) { output.append(contentsOf: $0) }
        try inflater.finish()
        return output
    }
}
