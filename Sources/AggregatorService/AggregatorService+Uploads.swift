import AdapterStore
import Digests
import Foundation
import HTTPServer
import LoRAAdapters

extension AggregatorService {
    func registerUploadRoutes(on routes: inout AuthorizedRoutes) {
        let uploadPath = "/v1/federations/{federation}/rounds/{round}/uploads/{client}"
        routes.add("PUT", uploadPath, .ownUpload, maxBodyBytes: configuration.maxUploadBytes) { [self] in try await putUpload($0, $1) }
        routes.add("GET", uploadPath, .ownUpload) { [self] request, _ in try await getUpload(request) }
        routes.add("DELETE", uploadPath, .ownUpload) { [self] request, _ in try await deleteUpload(request) }
    }

    private func putUpload(_ request: HTTPRequest, _ body: HTTPRequestBody) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(["rank", "weight", "lora_alpha", "use_rslora"])
        let federation = try parameters.federation
        let client = try parameters.client
        let round = try parameters.round
        let rank = try parameters.positiveInteger("rank")
        let weight = try parameters.positiveNumber("weight") ?? 1
        let coding = try Self.contentCoding(of: request)
        // Checked before the body is read, so Expect: 100-continue clients never send it.
        let form = try UploadForm(request, rank: rank, loraAlpha: try parameters.positiveNumber("lora_alpha"), useRSLoRA: try parameters.flag("use_rslora"))
        let bytes = try await receiveUpload(body, coding: coding, limit: configuration.maxUploadBytes + (form.isMultipart ? Self.multipartAllowance : 0))
        let maxUploadBytes = configuration.maxUploadBytes
        let upload = try await offload { () throws -> (SafetensorsFile, AdapterConfig, [UInt8]?, AdapterSummary, String) in
            let (fileBytes, config, configJSON) = try form.read(bytes, maxFileBytes: maxUploadBytes)
            let file = try SafetensorsFile(bytes: fileBytes)
            let summary = try AdapterValidator.validate(file, config: config)
            return (file, config, configJSON, summary, ContentDigest.sha256Hex(fileBytes))
        }
        let (file, config, configJSON, summary, digest) = upload
        let (record, created) = try await store.put(
            NewUpload(
                federation: federation, round: round, client: client, weight: weight, config: config, configJSON: configJSON, file: file, sha256: digest))
        metrics.uploadStored()
        return .json(
            created ? .created : .ok,
            UploadAccepted(
                federation: federation, round: round, client: client, rank: config.rank, weight: weight, loraAlpha: config.loraAlpha,
                useRslora: config.useRSLoRA, tensors: summary.tensorCount, loraModules: summary.loraModuleCount, bytes: record.bytes, sha256: record.sha256))
    }

    /// Room for a multipart body's config part and framing on top of the file's own limit.
    private static let multipartAllowance = UploadForm.maxConfigBytes + 64 * 1024

    /// The decompressed body, capped at `limit`; inflated chunk by chunk as it arrives.
    private func receiveUpload(_ body: HTTPRequestBody, coding: ContentCoding, limit: Int) async throws -> [UInt8] {
        guard coding != .identity else { return try await body.collect(upTo: limit) }
        let inflater = SerialInflater(try Inflater(coding: coding, limit: limit))
        for try await chunk in body {
            try await offload { try inflater.append(chunk) }
        }
        return try await offload { try inflater.finish() }
    }

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

/// An inflater used by one upload's chunks in turn.
private final class SerialInflater: @unchecked Sendable {
    // @unchecked: the upload handler awaits each call before making the next, so the inflater is
    // never used from two threads at once.
    private let inflater: Inflater
    init(_ inflater: Inflater) { self.inflater = inflater }
    func append(_ chunk: [UInt8]) throws { try inflater.append(chunk) }
    func finish() throws -> [UInt8] { try inflater.finish() }
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

    /// The safetensors bytes, the config, and the config as sent (multipart only).
    func read(_ body: [UInt8], maxFileBytes: Int) throws -> (file: [UInt8], config: AdapterConfig, configJSON: [UInt8]?) {
        switch kind {
        case .safetensors(let config):
            return (body, config, nil)
        case .multipart(let contentType, let rank):
            var reader = try MultipartFormDataReader(
                contentType: contentType, limits: MultipartLimits(maxPartBytes: [Self.modelPart: maxFileBytes, Self.configPart: Self.maxConfigBytes]))
            try reader.append(body)
            let parts = try reader.finish()
            guard let model = parts.first(where: { $0.name == Self.modelPart }), let json = parts.first(where: { $0.name == Self.configPart }) else {
                throw ServiceError(.badRequest, "a multipart upload needs the parts \"\(Self.modelPart)\" and \"\(Self.configPart)\"")
            }
            let config = try AdapterConfig(json: json.body)
            if let rank, rank != config.rank {
                throw AdapterError(.rankMismatch, "the query's rank \(rank) is not the config's r \(config.rank)")
            }
            return (model.body, config, json.body)
        }
    }
}
