import Foundation
import TestSupport
import Testing

@testable import AggregatorService

private let adminToken = "admin-token-0123456789abcdef"

private func startWithAdminToken() async throws -> ServiceProcess {
    let file = ScratchFiles.url("admin")
    try (adminToken + "\n").write(to: file, atomically: true, encoding: .utf8)
    return try await ServiceProcess.start(arguments: ["--admin-token-file", file.path])
}

private func bearer(_ token: String) -> [(String, String)] { [("Authorization", "Bearer \(token)")] }

@Suite(.serialized) struct ServiceAuthorizationTests {
    @Test func everyAllowedAndDeniedPair() async throws {
        let service = try await startWithAdminToken()
        let client = service.client
        let adapter = try TestRound.random(seed: 11, ranks: [4])[0].safetensors().bytes
        let upload = { (federation: String, who: String) in "/v1/federations/\(federation)/rounds/0/uploads/\(who)?rank=4" }

        // Tokens: only the admin issues them; a token is shown once and not cached.
        let issued = try await client.request("POST", "/v1/federations/fed/clients/alice/tokens", headers: bearer(adminToken))
        #expect(issued.statusCode == 201 && issued.header("Cache-Control") == "no-store")
        let alice = try #require(issued.json["token"] as? String)
        #expect(alice.count == 64)
        let bob = try #require(try await client.request("POST", "/v1/federations/fed/clients/bob/tokens", headers: bearer(adminToken)).json["token"] as? String)

        // The admin may do everything.
        #expect(try await client.request("PUT", upload("fed", "carol"), headers: bearer(adminToken), body: adapter).statusCode == 201)
        #expect(try await client.request("PUT", upload("other", "dave"), headers: bearer(adminToken), body: adapter).statusCode == 201)

        // A client token: its own uploads in its own federation, and reading that federation.
        let allowed: [(String, String, [UInt8], Int)] = [
            ("PUT", upload("fed", "alice"), adapter, 201),
            ("GET", "/v1/federations/fed/rounds/0/uploads/alice", [], 200),
            ("GET", "/v1/federations/fed/rounds/0", [], 200),
            ("GET", "/v1/federations/fed/rounds", [], 200),
            ("GET", "/v1/federations/fed/rounds/0/aggregate", [], 200),
            ("GET", "/v1/federations/fed/rounds/0/aggregate/carol", [], 200),
            ("DELETE", "/v1/federations/fed/rounds/0/uploads/alice", [], 204),
        ]
        for (method, path, body, status) in allowed {
            #expect(try await client.request(method, path, headers: bearer(alice), body: body).statusCode == status, "\(method) \(path)")
        }
        let denied: [(String, String, [UInt8])] = [
            ("PUT", upload("fed", "bob"), adapter),
            ("GET", "/v1/federations/fed/rounds/0/uploads/carol", []),
            ("DELETE", "/v1/federations/fed/rounds/0/uploads/carol", []),
            ("PUT", upload("other", "alice"), adapter),
            ("GET", "/v1/federations/other/rounds/0", []),
            ("GET", "/v1/federations/other/rounds", []),
            ("GET", "/v1/federations/other/rounds/0/aggregate", []),
            ("POST", "/v1/federations/fed/rounds/0/seal", []),
            ("POST", "/v1/federations/fed/clients/alice/tokens", []),
            ("DELETE", "/v1/federations/fed/clients/bob/tokens", []),
        ]
        for (method, path, body) in denied {
            let response = try await client.request(method, path, headers: bearer(alice), body: body)
            #expect(response.statusCode == 403 && response.header("Content-Type") == "application/problem+json", "\(method) \(path)")
        }
        #expect(try await client.get("/v1/federations/fed/rounds/0/uploads/carol").statusCode == 401)

        // Missing, malformed and unknown tokens: 401 with a Bearer challenge.
        for headers in [[], [("Authorization", "Basic YWRtaW46YWRtaW4=")], bearer("not-a-token"), bearer(adminToken + "x")] {
            let response = try await client.get("/v1/federations/fed/rounds/0", headers: headers)
            #expect(response.statusCode == 401 && response.header("WWW-Authenticate")?.hasPrefix("Bearer") == true, "\(headers)")
        }
        // Health, metrics and the contract stay open.
        for path in ["/healthz", "/metrics", "/openapi.yaml"] { #expect(try await client.get(path).statusCode == 200, "\(path)") }

        // Revoking bob's tokens: bob is locked out, alice is not.
        #expect(try await client.request("DELETE", "/v1/federations/fed/clients/bob/tokens", headers: bearer(adminToken)).statusCode == 204)
        #expect(try await client.get("/v1/federations/fed/rounds/0", headers: bearer(bob)).statusCode == 401)
        #expect(try await client.get("/v1/federations/fed/rounds/0", headers: bearer(alice)).statusCode == 200)
        #expect(try await client.request("POST", "/v1/federations/fed/rounds/0/seal", headers: bearer(adminToken)).statusCode == 200)
        #expect(await service.stop() == 0)
    }

    @Test func anUnauthorisedUploadIsRefusedBeforeItsBodyIsSent() async throws {
        let service = try await startWithAdminToken()
        let response: RawClient.Response = try await onOwnThread { [port = service.port] in
            let raw = try RawClient(port: port)
            try raw.send(
                "PUT /v1/federations/fed/rounds/0/uploads/alice?rank=4 HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")
            return try raw.readResponse()
        }
        #expect(response.statusCode == 401, "the final status, not 100 Continue")
        #expect(await service.stop() == 0)
    }

    @Test func refusesANonLoopbackAddressWithoutAnAdminToken() async throws {
        let (status, errorText) = try await onOwnThread { () throws -> (Int32, String) in
            let process = Process()
            process.executableURL = ServiceProcess.executable
            process.arguments = ["serve", "--host", "0.0.0.0", "--port", "0", "--database", try ServiceProcess.temporaryDatabase()]
            let errors = Pipe()
            process.standardError = errors
            process.standardOutput = Pipe()
            try process.run()
            process.waitUntilExit()
            return (process.terminationStatus, String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
        }
        #expect(status != 0)
        #expect(errorText.contains("refusing to serve 0.0.0.0 without authentication"))
    }

    @Test func loopbackDetectionAndConstantTimeComparison() {
        for host in ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"] { #expect(Authorization.isLoopback(host), "\(host)") }
        for host in ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "::ffff:10.0.0.1", "128.0.0.1"] {
            #expect(!Authorization.isLoopback(host), "\(host)")
        }
        #expect(Authorization.constantTimeEqual([1, 2, 3], [1, 2, 3]))
        #expect(!Authorization.constantTimeEqual([1, 2, 3], [1, 2, 4]))
        #expect(!Authorization.constantTimeEqual([1, 2, 3], [1, 2]))
    }
}
