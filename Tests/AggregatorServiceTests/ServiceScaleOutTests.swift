import Digests
import Foundation
import TestSupport
import Testing

@testable import AggregatorService

/// Several servers on one PostgreSQL database, as behind a load balancer: what one does, the others
/// see at once, and the database going away costs retries, never acknowledged data.
@Suite(.serialized) struct ServiceScaleOutTests {
    /// A token issued through one server works through the other; revoked through the other, it is
    /// refused by both at once (tokens are looked up in the database on every request).
    @Test(arguments: DatabaseBackend.available) func tokensIssuedAndRevokedAnywhereTakeEffectEverywhere(_ backend: DatabaseBackend) async throws {
        let adminToken = "admin-token-scale-out-0123456789"
        let tokenFile = ScratchFiles.url("admin")
        try (adminToken + "\n").write(to: tokenFile, atomically: true, encoding: .utf8)
        let database = try ServiceProcess.temporaryDatabase(backend)
        let one = try await ServiceProcess.start(database: database, arguments: ["--admin-token-file", tokenFile.path])
        let other = try await ServiceProcess.start(database: database, arguments: ["--admin-token-file", tokenFile.path])
        let admin = [("Authorization", "Bearer \(adminToken)")]
        let issued = try await one.client.request("POST", "/v1/federations/fed/clients/alice/tokens", headers: admin)
        let token = try #require(issued.json["token"] as? String)
        let adapter = try TestRound.random(seed: 5, ranks: [4])[0].safetensors().bytes
        let upload = "/v1/federations/fed/rounds/0/uploads/alice?rank=4"
        #expect(try await other.client.request("PUT", upload, headers: [("Authorization", "Bearer \(token)")], body: adapter).statusCode == 201)
        #expect(try await other.client.request("DELETE", "/v1/federations/fed/clients/alice/tokens", headers: admin).statusCode == 204)
        for server in [one, other] {
            #expect(try await server.client.get("/v1/federations/fed/rounds/0", headers: [("Authorization", "Bearer \(token)")]).statusCode == 401)
        }
        #expect(await one.stop() == 0)
        #expect(await other.stop() == 0)
    }

    /// A database that cannot be reached at start is an exit with a non-zero status and libpq's
    /// reason, and the URI's password is not repeated.
    @Test func anUnreachableDatabaseAtStartIsANonZeroExitWithTheReason() async throws {
        do {
            let started = try await ServiceProcess.start(database: "postgresql://lora:secret-password@127.0.0.1:1/lora")
            Issue.record("the server started")
            await started.stop()
        } catch let failure as ServiceProcess.ServerStartFailure {
            #expect(failure.reason == .exit && failure.status != 0)
            #expect(failure.log.contains("the database cannot be reached") && failure.log.contains("Connection refused"), "\(failure.log)")
            #expect(!failure.log.contains("secret-password") && failure.log.contains("lora:***@127.0.0.1:1"))
        }
    }

    /// Passwords never reach the logs, in either of libpq's forms; a SQLite path is shown as it is.
    @Test func theDatabaseAsLogsShowIt() {
        func shown(_ database: String) -> String {
            var configuration = ServiceConfiguration()
            configuration.database = database
            return configuration.databaseForLogs
        }
        #expect(shown("postgresql://lora:s3cret@db:5432/lora?sslmode=require") == "postgresql://lora:***@db:5432/lora?sslmode=require")
        #expect(shown("postgres://lora@db/lora?password=s3cret&sslmode=require") == "postgres://lora@db/lora?password=***&sslmode=require")
        #expect(shown("host=db dbname=lora password=s3cret user=lora") == "host=db dbname=lora password=*** user=lora")
        #expect(shown("./lora-aggregator.sqlite") == "./lora-aggregator.sqlite")
    }

    /// Two servers take uploads while their PostgreSQL server is stopped for two seconds and started
    /// again. Every answer is a 201 or a 503 problem with Retry-After (never a 500 or a dropped
    /// connection); uploads succeed again once it is back, without restarting either server; and
    /// every acknowledged upload is there, byte for byte, with equal aggregates through both.
    @Test(.enabled(if: DatabaseBackend.available.contains(.postgresql)))
    func theDatabaseRestartedUnderLoadLosesNothingAcknowledged() async throws {
        try await ThrowAwayCluster.with { cluster in
            let one = try await ServiceProcess.start(database: cluster.uri)
            let other = try await ServiceProcess.start(database: cluster.uri)
            let participants = TestRound.random(seed: 61, ranks: [2, 4, 8, 16])
            let files = try participants.map { try $0.safetensors().bytes }
            func put(_ index: Int, through server: ServiceProcess) async throws -> RawClient.Response {
                let participant = participants[index % participants.count]
                let path = "/v1/federations/restart/rounds/0/uploads/c\(index)?rank=\(participant.rank)"
                return try await server.client.request("PUT", path, body: files[index % files.count])
            }

            var acknowledged: Set<Int> = []
            var refused: [Int] = []
            let restarted = Gate()
            var restart: Task<Void, any Error>?
            var acknowledgedSinceRestart = 0
            // Uploads go on until the restart is over and four more went through after it.
            for index in 0..<2000 where acknowledgedSinceRestart < 4 {
                let response = try await put(index, through: index % 2 == 0 ? one : other)
                switch response.statusCode {
                case 201:
                    acknowledged.insert(index)
                    if restarted.isOpen { acknowledgedSinceRestart += 1 }
                case 503:
                    #expect(response.header("Content-Type") == "application/problem+json" && response.header("Retry-After") != nil)
                    refused.append(index)
                default: Issue.record("upload c\(index) answered \(response.statusCode): \(String(decoding: response.body, as: UTF8.self))")
                }
                if index == 10 {
                    restart = Task {
                        defer { restarted.open() }
                        try await cluster.restart(downSeconds: 2)
                    }
                }
            }
            try await restart?.value
            #expect(!refused.isEmpty, "the restart was seen")
            // Recovery without restarting the servers: each refused upload, sent again, is stored.
            for index in refused {
                var stored = false
                for attempt in 0..<50 where !stored {
                    if attempt > 0 { try await Task.sleep(for: .milliseconds(100)) }
                    stored = try await put(index, through: index % 2 == 0 ? other : one).statusCode == 201
                }
                #expect(stored, "c\(index) is stored once the database is back")
                acknowledged.insert(index)
            }
            for server in [one, other] {
                let round = try await server.client.get("/v1/federations/restart/rounds/0")
                let listed = Set(((round.json["uploads"] as? [[String: Any]]) ?? []).compactMap { ($0["client"] as? String).flatMap { Int($0.dropFirst()) } })
                #expect(acknowledged.isSubset(of: listed))
                for index in acknowledged.sorted().prefix(12) {
                    #expect(try await server.client.get("/v1/federations/restart/rounds/0/uploads/c\(index)").body == files[index % files.count])
                }
            }
            let fromOne = try await one.client.get("/v1/federations/restart/rounds/0/aggregate")
            let fromOther = try await other.client.get("/v1/federations/restart/rounds/0/aggregate")
            #expect(fromOne.statusCode == 200 && fromOne.body == fromOther.body && fromOne.header("ETag") == fromOther.header("ETag"))
            #expect(await one.stop() == 0)
            #expect(await other.stop() == 0)
        }
    }
}

/// A PostgreSQL cluster of a test's own (scripts/lib/postgres-cluster), stopped when the test's body ends.
private struct ThrowAwayCluster: Sendable {
    let directory: String
    let uri: String

    private static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("scripts/lib/postgres-cluster").path

    /// Runs `body` with a cluster of its own, stopped afterwards whether `body` throws or not.
    static func with(_ body: (ThrowAwayCluster) async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cluster-\(UUID().uuidString)").path
        let uri = try await run(["start", directory]).trimmingCharacters(in: .whitespacesAndNewlines)
        let cluster = ThrowAwayCluster(directory: directory, uri: uri)
        do {
            try await body(cluster)
        } catch {
            try? await cluster.stop()
            throw error
        }
        try await cluster.stop()
    }

    func restart(downSeconds: Int) async throws { _ = try await Self.run(["restart", directory, String(downSeconds)]) }

    private func stop() async throws { _ = try await Self.run(["stop", directory]) }

    /// Runs the script off the cooperative pool; returns its standard output.
    private static func run(_ arguments: [String]) async throws -> String {
        try await onOwnThread {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: script)
            process.arguments = arguments
            let output = Pipe()
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            try process.run()
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let succeeded = exitedCleanly(process)
            guard succeeded else { throw TestDatabaseError("postgres-cluster \(arguments.joined(separator: " ")) failed") }
            return text
        }
    }
}
