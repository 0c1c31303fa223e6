import Digests
import HTTPServer

/// Downloads of safetensors files (an upload as stored, a base, an aggregate): the same headers,
/// ETag, conditional answer and content-coding rule for all.
extension AggregatorService {
    /// A safetensors download whose ETag is its SHA-256 (an upload, a base).
    func download(_ bytes: [UInt8], sha256: String, for request: HTTPRequest) async throws -> HTTPResponse {
        try await download(bytes, tag: sha256, sha256: sha256, for: request)
    }

    /// A safetensors download: strong ETag from `tag`, `Repr-Digest` from `sha256` when known,
    /// If-None-Match → 304, zstd or gzip when the client names it.
    func download(_ bytes: [UInt8], tag: String, sha256: String?, for request: HTTPRequest) async throws -> HTTPResponse {
        let coding = Self.responseCoding(request)
        if request.method == "HEAD" || Self.notModified(request, tag: tag, coding: coding) {
            return Self.bodiless(tag: tag, sha256: sha256, byteCount: bytes.count, coding: coding, for: request)
        }
        var headers = Self.downloadHeaders(tag: tag, sha256: sha256, coding: coding)
        guard let coding else { return HTTPResponse(status: .ok, headers: headers, body: bytes) }
        headers.add("Content-Encoding", coding.rawValue)
        return HTTPResponse(status: .ok, headers: headers, body: try await offload { coding.compress(bytes) })
    }

    /// A 304 for a matching If-None-Match, else the answer to a HEAD: the GET's header fields, less
    /// the compressed length, which only compressing would tell (RFC 9110 §9.3.2 lets a HEAD omit it).
    /// A 304 carries the 200's fields too, Vary included (RFC 9110 §15.4.5). `byteCount` may be nil
    /// only for a 304 or a compressed answer.
    static func bodiless(tag: String, sha256: String?, byteCount: Int?, coding: ContentCoding?, for request: HTTPRequest) -> HTTPResponse {
        var headers = downloadHeaders(tag: tag, sha256: sha256, coding: coding)
        if notModified(request, tag: tag, coding: coding) { return HTTPResponse(status: .notModified, headers: headers) }
        if let coding { headers.add("Content-Encoding", coding.rawValue) }
        // The server sends this head alone and never runs the stream.
        return HTTPResponse(status: .ok, headers: headers, streamLength: coding == nil ? byteCount : nil) { _ in }
    }

    /// `Repr-Digest` (RFC 9530) is the digest of the representation as sent, so it goes only with
    /// uncompressed answers, and only when the SHA-256 is known without computing the body.
    static func downloadHeaders(tag: String, sha256: String?, coding: ContentCoding?) -> HTTPHeaders {
        var headers: HTTPHeaders = [
            "Content-Type": "application/octet-stream",
            "Content-Disposition": "attachment; filename=\"adapter_model.safetensors\"",
            "Vary": "Accept-Encoding",
        ]
        headers.add("ETag", etag(tag: tag, coding: coding).description)
        if coding == nil, let sha256, let digest = ContentDigest.reprDigest(sha256Hex: sha256) { headers.add("Repr-Digest", digest) }
        return headers
    }

    /// The ETag names the representation: compressed bytes are a different one.
    static func etag(tag: String, coding: ContentCoding?) -> EntityTag { EntityTag(coding.map { "\(tag)-\($0.rawValue)" } ?? tag) }

    /// True when If-None-Match matches the download's ETag: the answer is 304.
    static func notModified(_ request: HTTPRequest, tag: String, coding: ContentCoding?) -> Bool {
        request.ifNoneMatch.matches(etag(tag: tag, coding: coding))
    }

    /// The coding of a download: zstd or gzip only for clients that name it with a weight above 0
    /// (zstd at equal weights); without Accept-Encoding, or with only `*`, the answer stays the file
    /// itself, which scripts saving the bytes expect.
    static func responseCoding(_ request: HTTPRequest) -> ContentCoding? {
        let accepted = request.acceptEncoding
        let named = [ContentCoding.zstd, .gzip].filter { accepted.names($0.rawValue) }
        return named.max { accepted.quality(of: $0.rawValue) < accepted.quality(of: $1.rawValue) }
    }
}
