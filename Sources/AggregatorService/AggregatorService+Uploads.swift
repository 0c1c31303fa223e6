import AdapterStore
import Digests
import Foundation
import HTTPServer
import LoRAAdapters

extension AggregatorService {
    func registerUploadRoutes(on routes: inout AuthorizedRoutes) {
        let uploadPath = "/v1/federations/{federation}/rounds/{round}/uploads/{client}"
        routes.add("PUT", uploadPath, .ownUpload, maxBodyBytes: configuration.maxUploadBytes + Self.multipartAllowance) { [self] in try await putUpload($0, $1)
        }
        routes.add("GET", uploadPath, .ownUpload) { [self] request, _ in try await getUpload(request) }
        routes.add("DELETE", uploadPath, .ownUpload) { [self] request, _ in try await deleteUpload(request) }
    }

    private func putUpload(_ request: HTTPRequest, _ body: HTTPRequestBody) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(["rank", "weight", "lora_alpha", "use_rslora"])
        let federation = try parameters.federation
        let client = try parameters.client
        let round = try parameters.round
        let weight = try parameters.positiveNumber("weight") ?? 1
        let adapter = try await receiveAdapter(request, body, parameters)
        let (record, created, sealed) = try await store.put(
            NewUpload(
                federation: federation, round: round, client: client, weight: weight, config: adapter.config, configJSON: adapter.configJSON,
                file: adapter.file, sha256: adapter.sha256))
        metrics.uploadStored()
        if let sealed { metrics.roundSealed(by: sealed) }
        // Always: a deadline another process added is armed here too at this process's next write.
        // Not awaited: reading the next deadline may wait for a free read connection.
        let deadlines = self.deadlines
        Task { await deadlines.rearm() }
        return .json(
            created ? .created : .ok,
            UploadAccepted(
                federation: federation, round: round, client: client, rank: adapter.config.rank, weight: weight, loraAlpha: adapter.config.loraAlpha,
                useRslora: adapter.config.useRSLoRA, tensors: adapter.summary.tensorCount, loraModules: adapter.summary.loraModuleCount, bytes: record.bytes,
                sha256: record.sha256))
    }

    /// An adapter as a client sends one (openapi.yaml, "Upload"), decompressed, split and checked on
    /// its own: what an upload and a round base share.
    struct ReceivedAdapter: Sendable {
        let file: SafetensorsFile
        let config: AdapterConfig
        /// `adapter_config.json` as sent (multipart only).
        let configJSON: [UInt8]?
        let summary: AdapterSummary
        /// Of the safetensors file as sent.
        let sha256: String
    }

    /// Reads the body in either form (`rank`, `lora_alpha` and `use_rslora` from the query), refusing
    /// what the head alone rules out before the body is sent.
    func receiveAdapter(_ request: HTTPRequest, _ body: HTTPRequestBody, _ parameters: RequestParameters) async throws -> ReceivedAdapter {
        let coding = try Self.contentCoding(of: request)
        // Checked before the body is read, so Expect: 100-continue clients never send it.
        let form = try UploadForm(
            request, rank: try parameters.positiveInteger("rank"), loraAlpha: try parameters.positiveNumber("lora_alpha"),
            useRSLoRA: try parameters.flag("use_rslora"))
        let receiver = try UploadReceiver(
            form, coding: coding, declaredLength: request.headers["content-length"].flatMap { Int($0) }, maxFileBytes: configuration.maxUploadBytes)
        for try await chunk in body {
            if coding == .identity { try receiver.take(chunk) } else { try await offload { try receiver.take(chunk) } }
        }
        return try await offload {
            let (fileBytes, config, configJSON) = try form.read(try receiver.finish())
            let file = try SafetensorsFile(bytes: fileBytes)
            let summary = try AdapterValidator.validate(file, config: config)
            return ReceivedAdapter(file: file, config: config, configJSON: configJSON, summary: summary, sha256: ContentDigest.sha256Hex(fileBytes))
        }
    }

    /// Room for a multipart body's config part and framing on top of the file's own limit.
    static let multipartAllowance = UploadForm.maxConfigBytes + 64 * 1024

    private func getUpload(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let client = try parameters.client
        guard let (record, file) = try await store.upload(federation: federation, round: try parameters.round, client: client) else {
            throw ServiceError(.notFound, "client '\(client)' has no upload in this round")
        }
        return try await download(file, sha256: record.sha256, for: request)
    }

    private func deleteUpload(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let client = try parameters.client
        guard try await store.deleteUpload(federation: federation, round: try parameters.round, client: client) else {
            throw ServiceError(.notFound, "client '\(client)' has no upload in this round")
        }
        return HTTPResponse(status: .noContent)
    }

    static func contentCoding(of request: HTTPRequest) throws(ServiceError) -> ContentCoding {
        let codings = request.headers.tokens(for: "content-encoding")
        guard codings.count <= 1 else {
            throw ServiceError(.unsupportedMediaType, "only one content coding is supported", headers: ["Accept-Encoding": ContentCoding.acceptEncodingValue])
        }
        guard let name = codings.first else { return .identity }
        guard let coding = ContentCoding(rawValue: name) else {
            throw ServiceError(
                .unsupportedMediaType, "content coding '\(name)' is not supported", headers: ["Accept-Encoding": ContentCoding.acceptEncodingValue])
        }
        return coding
    }
}

/// An upload's body as it arrives, chunk by chunk: inflated when it is compressed and split into its
/// parts when it is multipart, so no stage holds a second copy of the whole.
final class UploadReceiver: @unchecked Sendable {
    // @unchecked: the upload handler awaits each call before making the next, so the receiver is
    // never used from two threads at once.
    enum Body {
        case file([UInt8])
        case parts([MultipartPart])
    }

    private let decoder: (any BodyDecoder)?
    /// Where the bytes go: one of the two, by the form.
    private var file: [UInt8]?
    private var multipart: MultipartFormDataReader?
    /// The decompressed bytes allowed in all; a multipart body's parts have their own limits within it.
    private let limit: Int
    private var received = 0
    /// The file's size as the body announces it (Content-Length, a zstd frame header), within the
    /// limit: the file is sized for it once, since growing by doubling would copy the file and fault
    /// its pages in about twice over. Unchecked, so what is reserved ahead of the bytes that arrived
    /// stays under `reserveAhead`.
    private var announcedSize: Int?
    private var sawFirstChunk = false
    private static let reserveAhead = 64 << 20

    /// Refuses an identity body whose declared length is already over the limit, before it is sent.
    init(_ form: UploadForm, coding: ContentCoding, declaredLength: Int?, maxFileBytes: Int) throws {
        limit = maxFileBytes + (form.isMultipart ? AggregatorService.multipartAllowance : 0)
        if coding == .identity, let declaredLength, declaredLength > limit {
            throw ServiceError(.contentTooLarge, "the upload of \(declaredLength) bytes exceeds the limit of \(limit) bytes")
        }
        decoder = try coding.decoder(limit: limit)
        multipart = try form.multipartReader(maxFileBytes: maxFileBytes)
        file = multipart == nil ? [] : nil
        if coding == .identity { announce(declaredLength) }
    }

    func take(_ chunk: [UInt8]) throws {
        defer { sawFirstChunk = true }
        guard let decoder else { return try chunk.withUnsafeBufferPointer { try deliver($0) } }
        if !sawFirstChunk { announce(decoder.announcedSize(atStartOf: chunk)) }
        try decoder.append(chunk) { try deliver($0) }
    }

    private func announce(_ size: Int?) {
        guard file != nil, let size, size <= limit else { return }
        announcedSize = size
        file!.reserveCapacity(min(size, Self.reserveAhead))
    }

    func finish() throws -> Body {
        try decoder?.finish()
        if let file { return .file(file) }
        return .parts(try multipart!.finish())
    }

    private func deliver(_ bytes: UnsafeBufferPointer<UInt8>) throws {
        received += bytes.count
        guard received <= limit else { throw ServiceError(.contentTooLarge, "the upload exceeds \(limit) bytes") }
        // Mutated through the optionals in place: a local copy would make each append copy the whole.
        if file != nil {
            // Past the first reservation: the rest of the announced size at once.
            if let announcedSize, announcedSize > file!.capacity, file!.count + bytes.count > file!.capacity { file!.reserveCapacity(announcedSize) }
            file!.append(contentsOf: bytes)
        } else {
            try multipart!.append(UnsafeRawBufferPointer(bytes))
        }
    }
}

/// The two forms of an upload body (openapi.yaml, "Upload"): the safetensors bytes tagged by query
/// parameters, or `multipart/form-data` with `adapter_model.safetensors` and `adapter_config.json`.
struct UploadForm: Sendable {
    static let maxConfigBytes = 1 << 20
    private static let modelPart = "adapter_model.safetensors"
    private static let configPart = "adapter_config.json"

    private enum Kind {
        case safetensors(AdapterConfig)
        case multipart(contentType: String, rank: Int?)
    }

    private let kind: Kind

    var isMultipart: Bool { if case .multipart = kind { true } else { false } }

    /// Decides the form from the request head alone, refusing what cannot work before any body is read.
    init(_ request: HTTPRequest, rank: Int?, loraAlpha: Double?, useRSLoRA: Bool?) throws {
        let contentType = request.headers["content-type"] ?? ""
        let mediaType = contentType.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased() ?? ""
        if mediaType == "multipart/form-data" {
            guard loraAlpha == nil, useRSLoRA == nil else {
                throw ServiceError(.badRequest, "a multipart upload takes lora_alpha and use_rslora from its adapter_config.json, not from the query")
            }
            // The boundary is checked now, so a malformed one is refused before the body is sent.
            _ = try MultipartFormDataReader(contentType: contentType, limits: MultipartLimits(maxPartBytes: [:]))
            kind = .multipart(contentType: contentType, rank: rank)
            return
        }
        // `curl --data-binary` labels bodies as form data unless told otherwise; the bytes are
        // checked as safetensors either way, so only types that promise something else are refused.
        guard ["", "application/octet-stream", "application/x-www-form-urlencoded"].contains(mediaType) else {
            throw ServiceError(
                .unsupportedMediaType, "uploads are application/octet-stream (a safetensors file) or multipart/form-data, not \(mediaType)")
        }
        guard let rank else {
            throw ServiceError(.badRequest, "query parameter 'rank' is required: the rank of every LoRA tensor in the upload")
        }
        kind = .safetensors(try AdapterConfig(rank: rank, loraAlpha: loraAlpha, useRSLoRA: useRSLoRA ?? false))
    }

    /// The reader of a multipart body's parts, or nil for a bare safetensors body.
    fileprivate func multipartReader(maxFileBytes: Int) throws -> MultipartFormDataReader? {
        guard case .multipart(let contentType, _) = kind else { return nil }
        return try MultipartFormDataReader(
            contentType: contentType, limits: MultipartLimits(maxPartBytes: [Self.modelPart: maxFileBytes, Self.configPart: Self.maxConfigBytes]))
    }

    /// The safetensors bytes, the config, and the config as sent (multipart only).
    func read(_ body: UploadReceiver.Body) throws -> (file: [UInt8], config: AdapterConfig, configJSON: [UInt8]?) {
        switch (kind, body) {
        case (.safetensors(let config), .file(let bytes)):
            return (bytes, config, nil)
        case (.multipart(_, let rank), .parts(let parts)):
            guard let model = parts.first(where: { $0.name == Self.modelPart }), let json = parts.first(where: { $0.name == Self.configPart }) else {
                throw ServiceError(.badRequest, "a multipart upload needs the parts \"\(Self.modelPart)\" and \"\(Self.configPart)\"")
            }
            let config = try AdapterConfig(json: json.body)
            if let rank, rank != config.rank {
                throw AdapterError(.rankMismatch, "the query's rank \(rank) is not the config's r \(config.rank)")
            }
            return (model.body, config, json.body)
        default:
            preconditionFailure("an UploadReceiver's body has the form it was made for")
        }
    }
}
