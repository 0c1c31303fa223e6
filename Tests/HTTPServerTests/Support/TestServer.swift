import HTTPServer
import TestSupport

/// A server on an ephemeral loopback port for one test.
struct TestServer {
    let server: HTTPServer
    let port: Int

    static func start(
        configure: (inout HTTPServerConfiguration) -> Void = { _ in },
        routes: (inout Router) -> Void = TestServer.standardRoutes
    ) throws -> TestServer {
        var configuration = HTTPServerConfiguration()
        configuration.port = 0
        configure(&configuration)
        var router = Router(defaultMaxBodyBytes: 1 << 20)
        routes(&router)
        let server = HTTPServer(configuration: configuration, router: router)
        let address = try server.start()
        return TestServer(server: server, port: address.port)
    }

    func stop() async {
        server.shutdown()
        await server.run()
    }

    func client(receiveTimeout: Double = 5) throws -> RawClient { try RawClient(port: port, receiveTimeout: receiveTimeout) }

    /// `/healthz`; `/echo` (PUT/POST: the body back); `/items/{id}` (GET: the decoded id);
    /// `/refuse` (PUT, no size limit: 403 without reading the body); `/slow` (GET: answers after 300 ms);
    /// `/stream` (GET: three chunks, no length); `/big` (PUT, 64 MiB limit: the body's byte count).
    static func standardRoutes(_ router: inout Router) {
        router.add("GET", "/healthz") { _, _ in HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"], body: Array(#"{"status":"ok"}"#.utf8))
        }
        for method in ["PUT", "POST"] {
            router.add(method, "/echo") { _, body in HTTPResponse(status: .ok, body: try await body.collect(upTo: 1 << 20)) }
        }
        router.add("GET", "/items/{id}") { request, _ in HTTPResponse(status: .ok, body: Array((request.pathParameters["id"] ?? "?").utf8)) }
        router.add("PUT", "/refuse", maxBodyBytes: .max) { _, _ in HTTPResponse(status: .forbidden, body: Array("no".utf8)) }
        router.add("GET", "/slow") { _, _ in
            try await Task.sleep(for: .milliseconds(300))
            return HTTPResponse(status: .ok, body: Array("slow".utf8))
        }
        router.add("GET", "/stream") { _, _ in
            HTTPResponse(status: .ok, streamLength: nil) { writer in
                for part in ["one,", "two,", "three"] { try await writer.write(Array(part.utf8)) }
            }
        }
        router.add("PUT", "/big", maxBodyBytes: 64 << 20) { _, body in
            var total = 0
            for try await chunk in body { total += chunk.count }
            return HTTPResponse(status: .ok, body: Array(#"{"bytes":\#(total)}"#.utf8))
        }
    }
}
