import AdapterStore
import Digests
import HTTPServer
import LoRAAdapters

/// Round bases (openapi.yaml, "Round base"): the global adapter a round started from, held at scale 1.
extension AggregatorService {
    func registerBaseRoutes(on routes: inout AuthorizedRoutes) {
        let path = Self.roundPath + "/base"
        routes.add("PUT", path, .admin, maxBodyBytes: configuration.maxUploadBytes + Self.multipartAllowance) { [self] in try await putBase($0, $1) }
        routes.add("GET", path, .federationMember) { [self] request, _ in try await getBase(request) }
        routes.add("DELETE", path, .admin) { [self] request, _ in try await deleteBase(request) }
    }

    private func putBase(_ request: HTTPRequest, _ body: HTTPRequestBody) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(["rank", "lora_alpha", "use_rslora"])
        let federation = try parameters.federation
        let round = try parameters.round
        let adapter = try await receiveAdapter(request, body, parameters)
        let (folded, sha256) = try await offload {
            let folded = try AdapterAggregator.foldedToUnitScale(adapter.file, config: adapter.config)
            return (folded, ContentDigest.sha256Hex(folded.bytes))
        }
        let (record, created) = try await store.putBase(federation: federation, round: round, file: folded, sha256: sha256)
        return .json(
            created ? .created : .ok,
            BaseAccepted(
                federation: federation, round: round, rank: record.rank, loraAlpha: adapter.config.loraAlpha, useRslora: adapter.config.useRSLoRA,
                tensors: adapter.summary.tensorCount, loraModules: adapter.summary.loraModuleCount, bytes: record.bytes, sha256: record.sha256,
                source: record.source.rawValue))
    }

    /// The base as stored, or, with any of `rank`, `dtype`, `lora_alpha`, `use_rslora`, cut and
    /// unfolded like the aggregate.
    private func getBase(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        let options: Set = ["rank", "dtype", "lora_alpha", "use_rslora"]
        try parameters.allowOnly(options)
        let federation = try parameters.federation
        let round = try parameters.round
        let notFound = ServiceError(.notFound, "round \(round) of federation '\(federation)' has no base")
        if !parameters.givesAny(of: options) {
            guard let (record, file) = try await store.storedBase(federation: federation, round: round) else { throw notFound }
            return try await download(file, sha256: record.sha256, for: request)
        }
        guard
            let bytes = try await store.baseAdapter(
                federation: federation, round: round, rank: try parameters.integer("rank"), dtype: try parameters.outputDType,
                scaling: try Self.targetScaling(parameters))
        else { throw notFound }
        return try await download(bytes, sha256: try await offload { ContentDigest.sha256Hex(bytes) }, for: request)
    }

    private func deleteBase(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let round = try parameters.round
        guard try await store.deleteBase(federation: federation, round: round) else {
            throw ServiceError(.notFound, "round \(round) of federation '\(federation)' has no base")
        }
        return HTTPResponse(status: .noContent)
    }
}
