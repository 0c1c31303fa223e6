import AdapterStore
import Dispatch
import Foundation
import HTTPServer

/// API v1 (openapi.yaml) over the HTTP layer, the adapter core and the store: the routes, their
/// handlers, content coding, problem+json errors and metrics. Each resource registers its own
/// routes (`AggregatorService+Uploads.swift` and its siblings). CPU-heavy steps (parsing,
/// validation, hashing, compression) run on a Dispatch queue of their own and the store's SQLite
/// calls on its own queues, so no handler blocks Swift's cooperative pool.
public final class AggregatorService: Sendable {
    public let configuration: ServiceConfiguration
    let store: AdapterStore
    let metrics = ServiceMetrics()
    let authorization: Authorization
    let deadlines: DeadlineTimer
    private let work = DispatchQueue(label: "lora-aggregator.work", attributes: .concurrent)

    /// Opens the database. Refuses a configuration that would expose `/v1` to the network without
    /// an admin token (unless `insecureNoAuth`).
    public init(configuration: ServiceConfiguration) throws {
        if configuration.adminToken == nil && !configuration.insecureNoAuth && !Authorization.isLoopback(configuration.http.host) {
            throw ServiceError(
                .badRequest,
                "refusing to serve \(configuration.http.host) without authentication: give an admin token (--admin-token-file or LORA_AGGREGATOR_ADMIN_TOKEN), listen on a loopback address, or pass --insecure-no-auth"
            )
        }
        if let token = configuration.adminToken, token.count < 16 {
            throw ServiceError(.badRequest, "the admin token must be at least 16 characters")
        }
        self.configuration = configuration
        self.store = try AdapterStore(
            database: configuration.database, aggregateCacheBytes: configuration.aggregateCacheBytes, readConnections: configuration.databaseConnections)
        self.authorization = Authorization(adminToken: configuration.adminToken, store: store)
        deadlines = DeadlineTimer(store: store, metrics: metrics)
    }

    /// An HTTP server for this service, not yet started. The round deadlines on record are armed.
    public func makeServer() -> HTTPServer {
        let deadlines = self.deadlines
        Task { await deadlines.rearm() }
        var http = configuration.http
        http.errorResponder = { Problem.response(for: $0) }
        let metrics = self.metrics
        let accessLog = configuration.accessLog
        http.onRequestCompleted = { request in
            metrics.record(request)
            if accessLog { Problem.log(request.accessLogLine) }
        }
        return HTTPServer(configuration: http, router: makeRouter())
    }

    public func makeRouter() -> Router {
        var routes = AuthorizedRoutes(router: Router(defaultMaxBodyBytes: 0), authorization: authorization)
        registerFederationRoutes(on: &routes)
        registerUploadRoutes(on: &routes)
        registerRoundRoutes(on: &routes)
        registerBaseRoutes(on: &routes)
        registerAggregateRoutes(on: &routes)
        registerReportRoutes(on: &routes)
        registerConfigRoutes(on: &routes)
        registerTokenRoutes(on: &routes)
        var router = routes.router
        registerServiceRoutes(on: &router)
        return router
    }

    static let roundPath = "/v1/federations/{federation}/rounds/{round}"

    /// The `/v1` routes: a handler runs only once the caller passes the route's requirement, before
    /// any of the body is read (so a refused upload is never sent with Expect: 100-continue).
    struct AuthorizedRoutes {
        private(set) var router: Router
        let authorization: Authorization

        mutating func add(
            _ method: String, _ pattern: String, _ requirement: Authorization.Requirement, maxBodyBytes: Int? = nil, _ handler: @escaping HTTPHandler
        ) {
            let authorization = self.authorization
            router.add(method, pattern, maxBodyBytes: maxBodyBytes) { request, body in
                try await authorization.check(request, requirement)
                return try await handler(request, body)
            }
        }
    }

    /// Runs CPU-heavy work off the cooperative pool.
    func offload<Value: Sendable>(_ work: @escaping @Sendable () throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            self.work.async { continuation.resume(with: Result { try work() }) }
        }
    }
}
