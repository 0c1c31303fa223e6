import AdapterStore
import HTTPServer
import LoRAAdapters

/// The `adapter_config.json` that loads each download with `PeftModel.from_pretrained`.
extension AggregatorService {
    func registerConfigRoutes(on routes: inout AuthorizedRoutes) {
        routes.add("GET", Self.roundPath + "/adapter_config", .federationMember) { [self] request, _ in try await getGlobalConfig(request) }
        routes.add("GET", Self.roundPath + "/adapter_config/{client}", .federationMember) { [self] request, _ in try await getClientConfig(request) }
    }

    /// The global adapter's config, for the same `rank`, `lora_alpha` and `use_rslora` as its download.
    private func getGlobalConfig(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(["rank", "lora_alpha", "use_rslora"])
        let scaling = try Self.targetScaling(parameters)
        let rank = try parameters.integer("rank")
        let configs = try await roundConfigs(parameters)
        // Resolved once: pattern matching is the costly part. Modules of a lower global rank keep theirs.
        let globalModuleRanks = configs.globalModuleRanks()
        let moduleRanks = globalModuleRanks.mapValues { min(rank ?? $0, $0) }
        let globalRank = globalModuleRanks.values.max() ?? configs.uploads.map(\.config.rank).max()!
        if let rank, !(1...globalRank).contains(rank) {
            throw AdapterError(.rankOutOfRange, "rank \(rank) is outside 1...\(globalRank), the largest rank in the round")
        }
        let (loraAlpha, useRSLoRA): (Double?, Bool) =
            switch scaling {
            case .uniform(let loraAlpha, let useRSLoRA): (loraAlpha, useRSLoRA)
            case .unit, .client: (nil, false)
            }
        let base = configs.uploads.first { $0.json != nil }?.json
        return Self.configResponse(try AdapterConfig.globalJSON(base: base, moduleRanks: moduleRanks, loraAlpha: loraAlpha, useRSLoRA: useRSLoRA))
    }

    /// A client's own config as it sent it (or the minimal one for an upload tagged by query).
    private func getClientConfig(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let client = try parameters.client
        guard let upload = try await roundConfigs(parameters).uploads.first(where: { $0.client == client }) else {
            throw ServiceError(.notFound, "client '\(client)' has no upload in round \(try parameters.round)")
        }
        return Self.configResponse(upload.json ?? upload.config.minimalJSON)
    }

    private func roundConfigs(_ parameters: RequestParameters) async throws -> RoundConfigs {
        let federation = try parameters.federation
        let round = try parameters.round
        guard let configs = try await store.configs(federation: federation, round: round) else {
            throw ServiceError(.notFound, "round \(round) of federation '\(federation)' has no uploads")
        }
        return configs
    }

    private static func configResponse(_ json: [UInt8]) -> HTTPResponse {
        HTTPResponse(
            status: .ok, headers: ["Content-Type": "application/json", "Content-Disposition": "attachment; filename=\"adapter_config.json\""], body: json)
    }
}
