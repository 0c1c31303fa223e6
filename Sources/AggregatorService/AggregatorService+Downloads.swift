import Foundation
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
        headers.add("ETag", etag(sha256: sha256, gzip: gzip))
        return headers
    }

    /// The ETag names the representation: gzip'd bytes are a different one.
    static func etag(sha256: String, gzip: Bool) -> String { gzip ? "\"\(sha256)-gzip\"" : "\"\(sha256)\"" }

    static func notModified(_ request: HTTPRequest, sha256: String, gzip: Bool) -> Bool {
        guard let ifNoneMatch = request.headers["if-none-match"] else { return false }
        return matches(ifNoneMatch, etag(sha256: sha256, gzip: gzip))
    }

    static func matches(_ ifNoneMatch: String, _ etag: String) -> Bool {
        ifNoneMatch.split(separator: ",").contains { candidate in
            let trimmed = candidate.trimmingCharacters(in: .whitespaces)
            return trimmed == "*" || trimmed == etag || trimmed == "W/" + etag
        }
    }

    static func acceptsGzip(_ request: HTTPRequest) -> Bool {
        request.headers.tokens(for: "accept-encoding").contains { token in
            let parts = token.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.first == "gzip" || parts.first == "x-gzip" else { return false }
            // "q=0" means "not acceptable" (RFC 9110 §12.4.2); no q means 1.
            let quality = parts.dropFirst().first { $0.hasPrefix("q=") }.flatMap { Double($0.dropFirst(2)) } ?? 1
            return quality > 0
        }
    }
}
