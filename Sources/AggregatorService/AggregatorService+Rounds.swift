import AdapterStore
import HTTPServer

extension AggregatorService {
    func registerRoundRoutes(on routes: inout AuthorizedRoutes) {
        routes.add("GET", Self.roundPath, .federationMember) { [self] request, _ in try await getRound(request) }
        routes.add("POST", Self.roundPath + "/seal", .admin) { [self] request, _ in try await sealRound(request) }
        routes.add("GET", "/v1/federations/{federation}/rounds", .federationMember) { [self] request, _ in try await listRounds(request) }
    }

    private func getRound(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let round = try parameters.round
        guard let record = try await store.round(federation: federation, round: round) else {
            throw ServiceError(.notFound, "round \(round) of federation '\(federation)' has no uploads, no base and is not sealed")
        }
        return .json(.ok, RoundBody(record))
    }

    private func sealRound(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let (record, sealedNow) = try await store.seal(federation: try parameters.federation, round: try parameters.round)
        if sealedNow { metrics.roundSealed(by: .request) }
        return .json(.ok, RoundBody(record))
    }

    private func listRounds(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let rounds = try await store.rounds(federation: federation)
        return .json(
            .ok, RoundList(federation: federation, rounds: rounds.map { .init(round: $0.round, sealed: $0.sealed, uploads: $0.uploads, maxRank: $0.maxRank) }))
    }
}
