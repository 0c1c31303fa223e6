import HTTPServer

/// Downloads of safetensors files (an upload as stored, an aggregate): the same headers, ETag,
/// conditional answer and gzip rule for both.
extension AggregatorService {
    /// A safetensors download: strong ETag, If-None-Match → 304, gzip when the client accepts it.
    func download(_ bytes: [UInt8], sha256: String, for request: HTTPRequest) async throws -> HTTPResponse {
        let gzip = Self.acceptsGzip(request)
        if request.method == "HEAD" || Self.notModified(request, sha256: sha256, gzip: gzip) {
            return Self.bodiless(sha256: sha256, byteCount: bytes.count, gzip: gzip, for: request)
        }
        var headers = Self.downloadHeaders(sha256: sha256, gzip: gzip)
        guard gzip else { return HTTPResponse(status: .ok, headers: headers, body: bytes) }
        headers.add("Content-Encoding", "gzip")
        return HTTPResponse(status: .ok, headers: headers, body: try await offload { ContentCoding.gzip.compress(bytes) })
    }

    /// A 304 for a matching If-None-Match, else the answer to a HEAD: the GET's header fields, less
    /// the gzip'd length, which only compressing would tell (RFC 9110 §9.3.2 lets a HEAD omit it).
    static func bodiless(sha256: String, byteCount: Int, gzip: Bool, for request: HTTPRequest) -> HTTPResponse {
        var headers = downloadHeaders(sha256: sha256, gzip: gzip)
        if notModified(request, sha256: sha256, gzip: gzip) { return HTTPResponse(status: .notModified, headers: headers) }
        if gzip { headers.add("Content-Encoding", "gzip") }
        // The server sends this head alone and never runs the stream.
        return HTTPResponse(status: .ok, headers: headers, streamLength: gzip ? nil : byteCount) { _ in }
    }

    static func downloadHeaders(sha256: String, gzip: Bool) -> HTTPHeaders {
        var headers: HTTPHeaders = [
            "Content-Type": "application/octet-stream",
            "Content-Disposition": "attachment; filename=\"adapter_model.safetensors\"",
            "Vary": "Accept-Encoding",
        ]
        headers.add("ETag", etag(sha256: sha256, gzip: gzip).description)
        return headers
    }

    /// The ETag names the representation: gzip'd bytes are a different one.
    static func etag(sha256: String, gzip: Bool) -> EntityTag { EntityTag(gzip ? "\(sha256)-gzip" : sha256) }

    /// True when If-None-Match matches the download's ETag: the answer is 304.
    static func notModified(_ request: HTTPRequest, sha256: String, gzip: Bool) -> Bool {
        request.ifNoneMatch.matches(etag(sha256: sha256, gzip: gzip))
    }

    /// gzip only for clients that name it with a weight above 0: without Accept-Encoding, or with
    /// only `*`, the answer stays the file itself, which scripts saving the bytes expect.
    static func acceptsGzip(_ request: HTTPRequest) -> Bool { request.acceptEncoding.names("gzip") }
}
