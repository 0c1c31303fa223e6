import HTTPServer

extension AggregatorService {
    func registerTokenRoutes(on routes: inout AuthorizedRoutes) {
        let tokensPath = "/v1/federations/{federation}/clients/{client}/tokens"
        routes.add("POST", tokensPath, .admin) { [self] request, _ in try await issueToken(request) }
        routes.add("DELETE", tokensPath, .admin) { [self] request, _ in try await revokeTokens(request) }
    }

    private func issueToken(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let token = try await authorization.issueToken(federation: try parameters.federation, client: try parameters.client)
        var response = HTTPResponse.json(.created, IssuedToken(token: token))
        response.headers.add("Cache-Control", "no-store")
        return response
    }

    private func revokeTokens(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        try await store.revokeClientTokens(federation: try parameters.federation, client: try parameters.client)
        return HTTPResponse(status: .noContent)
    }
}
