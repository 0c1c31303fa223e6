import AdapterStore
import Digests
import Dispatch
import Foundation
import HTTPServer
import LoRAAdapters

/// API v1 (../shared/API.md) over the HTTP layer, the adapter core and the store: the routes, their
/// handlers, content coding, problem+json errors and metrics. CPU-heavy steps (parsing, validation,
/// hashing, compression) run on a Dispatch queue of their own and the store's SQLite calls on its
/// own queues, so no handler blocks Swift's cooperative pool.
public final class AggregatorService: Sendable {
    public let configuration: ServiceConfiguration
    let store: AdapterStore
    let metrics = ServiceMetrics()
    let authorization: Authorization
    private let work = DispatchQueue(label: "lora-aggregator.work", attributes: .concurrent)

    /// Opens the database. Refuses a configuration that would expose `/v1` to the network without
    /// an admin token (unless `insecureNoAuth`).
    public init(configuration: ServiceConfiguration) throws {
        if configuration.adminToken == nil && !configuration.insecureNoAuth && !Authorization.isLoopback(configuration.http.host) {
            throw ServiceError(.badRequest, "refusing to serve \(configuration.http.host) without authentication: give an admin token (--admin-token-file or LORA_AGGREGATOR_ADMIN_TOKEN), listen on a loopback address, or pass --insecure-no-auth")
        }
        if let token = configuration.adminToken, token.count < 16 {
            throw ServiceError(.badRequest, "the admin token must be at least 16 characters")
        }
        self.configuration = configuration
        self.store = try AdapterStore(path: configuration.databasePath, aggregateCacheBytes: configuration.aggregateCacheBytes)
        self.authorization = Authorization(adminToken: configuration.adminToken, store: store)
    }

    /// An HTTP server for this service, not yet started.
    public func makeServer() -> HTTPServer {
        var http = configuration.http
        http.errorResponder = { Problem.response(for: $0) }
        let metrics = self.metrics
        let accessLog = configuration.accessLog
        http.onRequestCompleted = { request in
            metrics.record(request)
            if accessLog { FileHandle.standardError.write(Data((request.accessLogLine + "\n").utf8)) }
        }
        return HTTPServer(configuration: http, router: makeRouter())
    }

    static let uploadPath = "/v1/federations/{federation}/rounds/{round}/uploads/{client}"
    static let roundPath = "/v1/federations/{federation}/rounds/{round}"
    static let tokensPath = "/v1/federations/{federation}/clients/{client}/tokens"

    public func makeRouter() -> Router {
        var router = Router(defaultMaxBodyBytes: 0)
        let authorization = self.authorization
        /// Adds a `/v1` route whose handler runs only once the caller passes `requirement`, before
        /// any of the body is read (so a refused upload is never sent with Expect: 100-continue).
        func add(_ method: String, _ pattern: String, _ requirement: Authorization.Requirement, maxBodyBytes: Int? = nil, _ handler: @escaping HTTPHandler) {
            router.add(method, pattern, maxBodyBytes: maxBodyBytes) { request, body in
                try await authorization.check(request, requirement)
                return try await handler(request, body)
            }
        }
        add("PUT", Self.uploadPath, .ownUpload, maxBodyBytes: configuration.maxUploadBytes) { [self] in try await putUpload($0, $1) }
        add("GET", Self.uploadPath, .ownUpload) { [self] request, _ in try await getUpload(request) }
        add("DELETE", Self.uploadPath, .ownUpload) { [self] request, _ in try await deleteUpload(request) }
        add("GET", Self.roundPath, .federationMember) { [self] request, _ in try await getRound(request) }
        add("POST", Self.roundPath + "/seal", .admin) { [self] request, _ in try await sealRound(request) }
        add("GET", "/v1/federations/{federation}/rounds", .federationMember) { [self] request, _ in try await listRounds(request) }
        add("GET", Self.roundPath + "/aggregate", .federationMember) { [self] request, _ in try await getAggregate(request, perClient: false) }
        add("GET", Self.roundPath + "/aggregate/{client}", .federationMember) { [self] request, _ in try await getAggregate(request, perClient: true) }
        add("POST", Self.tokensPath, .admin) { [self] request, _ in try await issueToken(request) }
        add("DELETE", Self.tokensPath, .admin) { [self] request, _ in try await revokeTokens(request) }
        router.add("GET", "/healthz") { _, _ in Self.json(.ok, Health(status: "ok")) }
        router.add("GET", "/metrics") { [metrics] _, _ in
            HTTPResponse(status: .ok, headers: ["Content-Type": "text/plain; version=0.0.4; charset=utf-8"], body: Array(metrics.exposition().utf8))
        }
        router.add("GET", "/openapi.yaml") { _, _ in
            HTTPResponse(status: .ok, headers: ["Content-Type": "application/yaml"], body: Array(OpenAPIDocument.text.utf8))
        }
        return router
    }

    // MARK: Uploads

    private func putUpload(_ request: HTTPRequest, _ body: HTTPRequestBody) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(["rank", "weight"])
        let federation = try parameters.identifier("federation"), client = try parameters.identifier("client")
        let round = try parameters.round
        guard let rank = try parameters.positiveInteger("rank") else {
            throw ServiceError(.badRequest, "query parameter 'rank' is required: the rank of every LoRA tensor in the upload")
        }
        let weight = try parameters.positiveNumber("weight") ?? 1
        let coding = try Self.contentCoding(of: request)
        // `curl --data-binary` labels bodies as form data unless told otherwise; the bytes are
        // checked as safetensors either way, so only types that promise something else are refused.
        if let type = request.headers["content-type"]?.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased(),
           !["application/octet-stream", "application/x-www-form-urlencoded"].contains(type) {
            throw ServiceError(.unsupportedMediaType, "uploads are application/octet-stream (a safetensors file), not \(type)")
        }

        // Checked before the body is read, so Expect: 100-continue clients never send it.
        let bytes = try await receiveUpload(body, coding: coding)
        let (file, summary, digest) = try await offload { () throws -> (SafetensorsFile, AdapterSummary, String) in
            let file = try SafetensorsFile(bytes: bytes)
            let summary = try AdapterValidator.validate(file, declaredRank: rank)
            return (file, summary, ContentDigest.sha256Hex(bytes))
        }
        let (record, created) = try await store.put(NewUpload(federation: federation, round: round, client: client, rank: rank, weight: weight, file: file, sha256: digest))
        metrics.uploadStored()
        return Self.json(created ? .created : .ok, UploadAccepted(
            federation: federation, round: round, client: client, rank: rank, weight: weight,
            tensors: summary.tensorCount, loraModules: summary.loraModuleCount, bytes: record.bytes, sha256: record.sha256))
    }

    /// The decompressed body, capped at `maxUploadBytes`; inflated chunk by chunk as it arrives.
    private func receiveUpload(_ body: HTTPRequestBody, coding: ContentCoding) async throws -> [UInt8] {
        guard coding != .identity else { return try await body.collect(upTo: configuration.maxUploadBytes) }
        let inflater = SerialInflater(try Inflater(coding: coding, limit: configuration.maxUploadBytes))
        for try await chunk in body {
            try await offload { try inflater.append(chunk) }
        }
        return try await offload { try inflater.finish() }
    }

    private func getUpload(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.identifier("federation"), client = try parameters.identifier("client")
        guard let (record, file) = try await store.upload(federation: federation, round: try parameters.round, client: client) else {
            throw ServiceError(.notFound, "client '\(client)' has no upload in this round")
        }
        return try await download(file, sha256: record.sha256, for: request)
    }

    private func deleteUpload(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.identifier("federation"), client = try parameters.identifier("client")
        guard try await store.deleteUpload(federation: federation, round: try parameters.round, client: client) else {
            throw ServiceError(.notFound, "client '\(client)' has no upload in this round")
        }
        return HTTPResponse(status: .noContent)
    }

    // MARK: Rounds

    private func getRound(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.identifier("federation"), round = try parameters.round
        guard let record = try await store.round(federation: federation, round: round) else {
            throw ServiceError(.notFound, "round \(round) of federation '\(federation)' has no uploads and is not sealed")
        }
        return Self.json(.ok, RoundBody(record))
    }

    private func sealRound(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let record = try await store.seal(federation: try parameters.identifier("federation"), round: try parameters.round)
        return Self.json(.ok, RoundBody(record))
    }

    private func listRounds(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.identifier("federation")
        let rounds = try await store.rounds(federation: federation)
        return Self.json(.ok, RoundList(federation: federation, rounds: rounds.map { .init(round: $0.round, sealed: $0.sealed, uploads: $0.uploads, maxRank: $0.maxRank) }))
    }

    // MARK: Client tokens

    private func issueToken(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let token = try await authorization.issueToken(federation: try parameters.identifier("federation"), client: try parameters.identifier("client"))
        var response = Self.json(.created, IssuedToken(token: token))
        response.headers.add("Cache-Control", "no-store")
        return response
    }

    private func revokeTokens(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        try await store.revokeClientTokens(federation: try parameters.identifier("federation"), client: try parameters.identifier("client"))
        return HTTPResponse(status: .noContent)
    }

    // MARK: Aggregates

    private func getAggregate(_ request: HTTPRequest, perClient: Bool) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(perClient ? ["strategy", "dtype"] : ["strategy", "rank", "dtype"])
        let federation = try parameters.identifier("federation"), round = try parameters.round
        let client = perClient ? try parameters.identifier("client") : nil
        let gzip = Self.acceptsGzip(request)
        let started = ContinuousClock.now
        // An aggregate computed before has its ETag on record: a matching If-None-Match or a HEAD
        // needs no computing, and a GET streams the body while it is computed. A gzip'd answer
        // needs the whole file first.
        let outcome = try await store.aggregate(federation: federation, round: round, client: client, strategy: try parameters.strategy,
                                                rank: try parameters.integer("rank"), dtype: try parameters.outputDType) { digest in
            if request.method == "HEAD" || Self.notModified(request, sha256: digest.sha256, gzip: gzip) { return .digestOnly }
            return gzip ? .compute : .stream
        }
        let metrics = self.metrics
        let recordAggregation = { @Sendable in metrics.aggregationFinished(seconds: Double((ContinuousClock.now - started) / .microseconds(1)) / 1e6) }
        switch outcome {
        case nil:
            throw ServiceError(.notFound, client.map { "client '\($0)' has no upload in round \(round)" } ?? "round \(round) of federation '\(federation)' has no uploads")
        case .complete(let aggregate)?:
            if !aggregate.fromCache { recordAggregation() }
            return try await download(aggregate.bytes, sha256: aggregate.sha256, for: request)
        case .digestOnly(let digest)?:
            return Self.bodiless(sha256: digest.sha256, byteCount: digest.byteCount, gzip: gzip, for: request)
        case .streaming(let digest, let pieces)?:
            return HTTPResponse(status: .ok, headers: Self.downloadHeaders(sha256: digest.sha256, gzip: false), streamLength: digest.byteCount) { writer in
                do {
                    for try await piece in pieces { try await writer.write(piece) }
                } catch {
                    // The head is out, so no problem+json can follow: the connection closes short.
                    if !(error is HTTPServerError) { Problem.log("an aggregate stream failed after its head was sent: \(error)") }
                    throw error
                }
                recordAggregation()
            }
        }
    }

    // MARK: Shared

    /// A safetensors download: strong ETag, If-None-Match → 304, gzip when the client accepts it.
    private func download(_ bytes: [UInt8], sha256: String, for request: HTTPRequest) async throws -> HTTPResponse {
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

    static func contentCoding(of request: HTTPRequest) throws(ServiceError) -> ContentCoding {
        let codings = request.headers.tokens(for: "content-encoding")
        guard codings.count <= 1 else {
            throw ServiceError(.unsupportedMediaType, "only one content coding is supported", headers: ["Accept-Encoding": ContentCoding.acceptEncodingValue])
        }
        guard let name = codings.first else { return .identity }
        guard let coding = ContentCoding(rawValue: name) else {
            throw ServiceError(.unsupportedMediaType, "content coding '\(name)' is not supported", headers: ["Accept-Encoding": ContentCoding.acceptEncodingValue])
        }
        return coding
    }

    static func json(_ status: HTTPStatus, _ value: some Encodable) -> HTTPResponse {
        HTTPResponse(status: status, headers: ["Content-Type": "application/json"], body: JSON.encode(value))
    }

    /// Runs CPU-heavy work off the cooperative pool.
    private func offload<Value: Sendable>(_ work: @escaping @Sendable () throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            self.work.async { continuation.resume(with: Result { try work() }) }
        }
    }
}

/// An inflater used by one upload's chunks in turn.
private final class SerialInflater: @unchecked Sendable {
    // @unchecked: the upload handler awaits each call before making the next, so the inflater is
    // never used from two threads at once.
    private let inflater: Inflater
    init(_ inflater: Inflater) { self.inflater = inflater }
    func append(_ chunk: [UInt8]) throws { try inflater.append(chunk) }
    func finish() throws -> [UInt8] { try inflater.finish() }
}
