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

/// Streaming decompression with a cap on the output: input arrives in chunks, output grows only as
/// far as the cap, so a small bomb that would inflate past it fails with 413 without the server ever
/// allocating the cap.
final class Inflater {
    private var stream = z_stream()
    private let limit: Int
    private(set) var output: [UInt8] = []
    private(set) var finished = false

    init(coding: ContentCoding, limit: Int) throws(ServiceError) {
        self.limit = limit
        guard czlib_inflate_init2(&stream, coding.windowBits) == Z_OK else {
            throw ServiceError(.internalError, "the decompressor could not start")
        }
    }

    deinit { inflateEnd(&stream) }

    /// Inflates `chunk`; throws 413 past the limit, 400 for a corrupt stream or data after its end.
    func append(_ chunk: [UInt8]) throws(ServiceError) {
        guard !chunk.isEmpty else { return }
        guard !finished else { throw ServiceError(.badRequest, "data follows the end of the compressed stream") }
        var input = chunk
        var scratch = [UInt8](repeating: 0, count: 256 * 1024)
        let status: Int32 = input.withUnsafeMutableBufferPointer { source in
            stream.next_in = source.baseAddress
            stream.avail_in = UInt32(source.count)
            while true {
                let (status, produced) = scratch.withUnsafeMutableBufferPointer { buffer in
                    stream.next_out = buffer.baseAddress
                    stream.avail_out = UInt32(buffer.count)
                    let status = inflate(&stream, Z_NO_FLUSH)
                    return (status, buffer.count - Int(stream.avail_out))
                }
                guard status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR else { return status }
                guard output.count + produced <= limit else { return Z_MEM_ERROR }
                output.append(contentsOf: scratch[0..<produced])
                if status == Z_STREAM_END { return stream.avail_in == 0 ? Z_STREAM_END : Z_DATA_ERROR }
                // All input taken and the output buffer not filled: this chunk is done.
                if stream.avail_in == 0 && stream.avail_out > 0 { return Z_OK }
                if status == Z_BUF_ERROR { return Z_OK }
            }
        }
        switch status {
        case Z_OK: break
        case Z_STREAM_END: finished = true
        case Z_MEM_ERROR: throw ServiceError(.contentTooLarge, "the decompressed upload exceeds \(limit) bytes")
        default: throw ServiceError(.badRequest, "the compressed body is corrupt")
        }
    }

    /// The decompressed bytes; throws 400 when the stream ended early.
    func finish() throws(ServiceError) -> [UInt8] {
        guard finished else { throw ServiceError(.badRequest, "the compressed body ends before its stream does") }
        return output
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
        try inflater.append(bytes)
        return try inflater.finish()
    }
}
