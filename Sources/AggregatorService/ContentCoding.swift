import CZlib
import CZstd

/// The request and response content codings the service speaks (RFC 9110 §8.4.1; zstd, RFC 8878).
enum ContentCoding: String, CaseIterable {
    case identity
    case gzip
    case deflate
    case zstd

    static let acceptEncodingValue = "gzip, deflate, zstd, identity"

    /// zlib's windowBits for this coding: 15 + 16 reads and writes the gzip wrapper; 15 alone the
    /// zlib wrapper, which is what HTTP's "deflate" means.
    var windowBits: Int32 { self == .gzip ? 15 + 16 : 15 }

    /// A streaming decoder of this coding with its output capped at `limit`; nil for identity.
    func decoder(limit: Int) throws(ServiceError) -> (any BodyDecoder)? {
        switch self {
        case .identity: nil
        case .gzip, .deflate: try Inflater(coding: self, limit: limit)
        case .zstd: try ZstdDecoder(limit: limit)
        }
    }
}

/// Streaming decompression with a cap on the output: input arrives in chunks, and the output is
/// handed on in pieces as it is produced, so a small bomb that would decode past the cap fails with
/// 413 without the server ever allocating it.
protocol BodyDecoder: AnyObject {
    /// Decodes `chunk`, passing each piece of output to `sink` (valid only during the call); throws
    /// 413 past the limit, 400 for a corrupt stream or data after its end, and what `sink` throws.
    func append(_ chunk: [UInt8], to sink: (UnsafeBufferPointer<UInt8>) throws -> Void) throws
    /// Throws 400 when the compressed stream has not ended.
    func finish() throws(ServiceError)
    /// The decoded size the stream announces in its first bytes (`chunk`), where the coding has a
    /// field for it; unchecked: only a hint for sizing a buffer.
    func announcedSize(atStartOf chunk: [UInt8]) -> Int?
}

extension BodyDecoder {
    func announcedSize(atStartOf chunk: [UInt8]) -> Int? { nil }
}

/// gzip and deflate, by zlib.
final class Inflater: BodyDecoder {
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

    func finish() throws(ServiceError) {
        guard finished else { throw ServiceError(.badRequest, "the compressed body ends before its stream does") }
    }
}

/// zstd (RFC 8878), by libzstd: one or more frames, windows up to 2^27 bytes (RFC 8878 §3.1.1.1.2
/// recommends decoders support 8 MB; larger windows are refused rather than allocated).
final class ZstdDecoder: BodyDecoder {
    private let stream: OpaquePointer
    private let limit: Int
    private var produced = 0
    private var scratch = [UInt8](repeating: 0, count: 256 * 1024)
    /// The last call ended a frame and flushed it: the body may end here.
    private var atFrameEnd = false
    private var receivedAny = false

    init(limit: Int) throws(ServiceError) {
        guard let stream = ZSTD_createDStream() else { throw ServiceError(.internalError, "the decompressor could not start") }
        self.stream = stream
        self.limit = limit
        _ = ZSTD_DCtx_setParameter(stream, ZSTD_d_windowLogMax, 27)
    }

    deinit { ZSTD_freeDStream(stream) }

    func append(_ chunk: [UInt8], to sink: (UnsafeBufferPointer<UInt8>) throws -> Void) throws {
        guard !chunk.isEmpty else { return }
        receivedAny = true
        try chunk.withUnsafeBytes { source in
            var input = ZSTD_inBuffer(src: source.baseAddress, size: source.count, pos: 0)
            try scratch.withUnsafeMutableBufferPointer { buffer in
                // Until the chunk is consumed and the output buffer is not full (nothing held back).
                while true {
                    var output = ZSTD_outBuffer(dst: buffer.baseAddress, size: buffer.count, pos: 0)
                    let result = ZSTD_decompressStream(stream, &output, &input)
                    guard ZSTD_isError(result) == 0 else {
                        throw ServiceError(.badRequest, "the zstd body is corrupt (\(String(cString: ZSTD_getErrorName(result))))")
                    }
                    guard produced + output.pos <= limit else {
                        throw ServiceError(.contentTooLarge, "the decompressed upload exceeds \(limit) bytes")
                    }
                    produced += output.pos
                    if output.pos > 0 { try sink(UnsafeBufferPointer(rebasing: buffer[0..<output.pos])) }
                    atFrameEnd = result == 0
                    if input.pos == input.size && output.pos < output.size { return }
                }
            }
        }
    }

    /// A frame header's content size (zstd writes it when the compressor knew the input's size).
    func announcedSize(atStartOf chunk: [UInt8]) -> Int? {
        let size = chunk.withUnsafeBytes { ZSTD_getFrameContentSize($0.baseAddress, $0.count) }
        return size < ZSTD_CONTENTSIZE_ERROR ? Int(exactly: size) : nil
    }

    func finish() throws(ServiceError) {
        guard receivedAny && atFrameEnd else { throw ServiceError(.badRequest, "the compressed body ends before its stream does") }
    }
}

extension ContentCoding {
    /// `bytes` compressed in this coding (gzip and zstd for responses; tests make deflate bodies with
    /// it) by `ResponseEncoder`, so a body compressed whole and one compressed as it streams are the
    /// same bytes. `level` is zlib's; zstd uses its own fast level 1.
    func compress(_ bytes: [UInt8], level: Int32 = Z_BEST_SPEED) -> [UInt8] {
        guard self != .identity, let encoder = ResponseEncoder(coding: self, level: level) else { return bytes }
        return encoder.encode(bytes) + encoder.finish()
    }
}

/// Streaming compression of a response body. Nothing is flushed before the end, so the output
/// depends only on the bytes, not on how they were split into pieces (both libraries buffer input
/// up to their block or window); the tests check it. Used by one task at a time.
final class ResponseEncoder: @unchecked Sendable {
    // @unchecked: the C stream is only touched by the task writing the body, one piece at a time.
    private enum Stream {
        case zlib(UnsafeMutablePointer<z_stream>)
        case zstd(OpaquePointer)
    }
    private let stream: Stream
    private var output = [UInt8](repeating: 0, count: 1 << 17)

    /// Nil for identity and deflate, or when the library cannot start a stream.
    init?(coding: ContentCoding, level: Int32 = Z_BEST_SPEED) {
        switch coding {
        case .identity:
            return nil
        case .gzip, .deflate:
            let zlib = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            zlib.initialize(to: z_stream())
            guard czlib_deflate_init2(zlib, level, coding.windowBits) == Z_OK else {
                zlib.deallocate()
                return nil
            }
            stream = .zlib(zlib)
        case .zstd:
            guard let context = ZSTD_createCCtx() else { return nil }
            ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, 1)
            stream = .zstd(context)
        }
    }

    deinit {
        switch stream {
        case .zlib(let zlib):
            deflateEnd(zlib)
            zlib.deallocate()
        case .zstd(let context):
            ZSTD_freeCCtx(context)
        }
    }

    /// The compressed bytes `piece` completes (often none: they wait for a full block).
    func encode(_ piece: [UInt8]) -> [UInt8] { run(piece, finishing: false) }

    /// The rest of the stream, trailer included.
    func finish() -> [UInt8] { run([], finishing: true) }

    private func run(_ input: [UInt8], finishing: Bool) -> [UInt8] {
        var produced: [UInt8] = []
        input.withUnsafeBytes { source in
            output.withUnsafeMutableBytes { destination in
                switch stream {
                case .zlib(let zlib):
                    zlib.pointee.next_in = UnsafeMutablePointer(mutating: source.baseAddress?.assumingMemoryBound(to: UInt8.self))
                    zlib.pointee.avail_in = UInt32(source.count)
                    while true {
                        zlib.pointee.next_out = destination.baseAddress!.assumingMemoryBound(to: UInt8.self)
                        zlib.pointee.avail_out = UInt32(destination.count)
                        let status = CZlib.deflate(zlib, finishing ? Z_FINISH : Z_NO_FLUSH)
                        produced.append(contentsOf: destination.prefix(destination.count - Int(zlib.pointee.avail_out)))
                        if finishing ? status == Z_STREAM_END : zlib.pointee.avail_in == 0 && zlib.pointee.avail_out > 0 { break }
                        if status != Z_OK && status != Z_BUF_ERROR { break }
                    }
                case .zstd(let context):
                    var inBuffer = ZSTD_inBuffer(src: source.baseAddress, size: source.count, pos: 0)
                    while true {
                        var outBuffer = ZSTD_outBuffer(dst: destination.baseAddress, size: destination.count, pos: 0)
                        let remaining = ZSTD_compressStream2(context, &outBuffer, &inBuffer, finishing ? ZSTD_e_end : ZSTD_e_continue)
                        produced.append(contentsOf: destination.prefix(outBuffer.pos))
                        if ZSTD_isError(remaining) != 0 { break }
                        if finishing ? remaining == 0 : inBuffer.pos == inBuffer.size && outBuffer.pos < outBuffer.size { break }
                    }
                }
            }
        }
        return produced
    }
}

/// Request-body decoding as one call, for tools (the fuzzer) outside the service.
public enum ContentDecoding {
    /// `bytes` decoded from `coding` ("gzip", "deflate" or "zstd"), refusing output past `limit` bytes.
    public static func inflate(_ bytes: [UInt8], coding: String, limit: Int) throws -> [UInt8] {
        guard let coding = ContentCoding(rawValue: coding), let decoder = try coding.decoder(limit: limit) else {
            throw ServiceError(.unsupportedMediaType, "content coding '\(coding)' is not supported")
        }
        var output: [UInt8] = []
        try decoder.append(bytes) { output.append(contentsOf: $0) }
        try decoder.finish()
        return output
    }
}
