import HTTPServer

extension AggregatorService {
    /// The service's own endpoints, open to anyone: liveness, metrics and the API document.
    func registerServiceRoutes(on router: inout Router) {
        router.add("GET", "/healthz") { _, _ in .json(.ok, Health(status: "ok")) }
        router.add("GET", "/metrics") { [metrics] _, _ in
            HTTPResponse(status: .ok, headers: ["Content-Type": "text/plain; version=0.0.4; charset=utf-8"], body: Array(metrics.exposition().utf8))
        }
        router.add("GET", "/openapi.yaml") { _, _ in
            HTTPResponse(status: .ok, headers: ["Content-Type": "application/yaml"], body: Array(OpenAPIDocument.text.utf8))
        }
    }
}
