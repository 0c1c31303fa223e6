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
        try parameters.allowOnly(["rank", "weight"])
        let federation = try parameters.federation
        let client = try parameters.client
        let round = try parameters.round
        guard let rank = try parameters.positiveInteger("rank") else {
            throw ServiceError(.badRequest, "query parameter 'rank' is required: the rank of every LoRA tensor in the upload")
        }
        let weight = try parameters.positiveNumber("weight") ?? 1
        let coding = try Self.contentCoding(of: request)
        // `curl --data-binary` labels bodies as form data unless told otherwise; the bytes are
        // checked as safetensors either way, so only types that promise something else are refused.
        if let type = request.headers["content-type"]?.split(separator: ";").first?.trimmingCharacters(in: .whitespaces).lowercased(),
            !["application/octet-stream", "application/x-www-form-urlencoded"].contains(type)
        {
            throw ServiceError(.unsupportedMediaType, "uploads are application/octet-stream (a safetensors file), not \(type)")
        }

        // Checked before the body is read, so Expect: 100-continue clients never send it.
        let bytes = try await receiveUpload(body, coding: coding)
        let (file, summary, digest) = try await offload { () throws -> (SafetensorsFile, AdapterSummary, String) in
            let file = try SafetensorsFile(bytes: bytes)
            let summary = try AdapterValidator.validate(file, declaredRank: rank)
            return (file, summary, ContentDigest.sha256Hex(bytes))
        }
        let (record, created) = try await store.put(
            NewUpload(federation: federation, round: round, client: client, rank: rank, weight: weight, file: file, sha256: digest))
        metrics.uploadStored()
        return .json(
            created ? .created : .ok,
            UploadAccepted(
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
