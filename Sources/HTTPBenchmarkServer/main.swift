// The same trivial routes as ../shared/peers/hummingbird, on this package's HTTP layer, for
// scripts/bench/http. Usage: HTTPBenchmarkServer [PORT]   (default 8081, 127.0.0.1)
//   GET /healthz -> {"status":"ok"}
//   PUT /sink    -> reads the whole body (up to 1 GiB), answers its byte count as JSON
import HTTPServer

var router = Router()
router.add("GET", "/healthz") { _, _ in
    HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"], body: Array(#"{"status":"ok"}"#.utf8))
}
router.add("PUT", "/sink", maxBodyBytes: 1 << 30) { _, body in
    var total = 0
    for try await chunk in body { total += chunk.count }
    return HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"], body: Array(#"{"bytes":\#(total)}"#.utf8))
}
var configuration = HTTPServerConfiguration()
configuration.port = CommandLine.arguments.dropFirst().first.flatMap(Int.init) ?? 8081
let server = HTTPServer(configuration: configuration, router: router)
let address = try server.start()
print("HTTPBenchmarkServer listening on \(address)")
await server.run()
