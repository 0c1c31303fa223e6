import Digests
import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

@Suite(.serialized) struct ServiceReliabilityTests {
    /// Concurrent uploads, SIGKILL in the middle: every upload that got a 2xx is there with its
    /// digest, through another server on the same database that ran all along and through a
    /// restarted one, and nothing is partial.
    @Test(arguments: DatabaseBackend.available) func uploadsAcknowledgedBeforeASIGKILLSurviveIt(_ backend: DatabaseBackend) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let service = try await ServiceProcess.start(database: database)
        let other = try await ServiceProcess.start(database: database)
        let files = try (0..<48).map { index in try TestRound.random(seed: UInt64(3000 + index), ranks: [16])[0].safetensors().bytes }
        // Each upload reports (index, digest) when acknowledged with a 2xx; the kill comes as the
        // fourth is, while the rest are still in flight.
        let acknowledgedNow = try await withThrowingTaskGroup(of: (Int, String)?.self) { group in
            for (index, file) in files.enumerated() {
                group.addTask {
                    let response = try? await service.client.request("PUT", "/v1/federations/crash/rounds/0/uploads/c\(index)?rank=16", body: file)
                    guard let response, (200..<300).contains(response.statusCode), let digest = response.json["sha256"] as? String else { return nil }
                    return (index, digest)
                }
            }
            var acknowledged: [Int: String] = [:]
            for try await case (let index, let digest)? in group {
                acknowledged[index] = digest
                if acknowledged.count == 4 { await service.kill() }
            }
            return acknowledged
        }
        #expect(acknowledgedNow.count >= 4)

        let restarted = try await ServiceProcess.start(database: database)
        for survivor in [other, restarted] {
            let round = try await survivor.client.get("/v1/federations/crash/rounds/0")
            let listed = (round.json["uploads"] as? [[String: Any]]) ?? []
            for (index, digest) in acknowledgedNow {
                let stored = try await survivor.client.get("/v1/federations/crash/rounds/0/uploads/c\(index)")
                #expect(stored.statusCode == 200, "acknowledged upload c\(index) is missing")
                #expect(ContentDigest.sha256Hex(stored.body) == digest && stored.body == files[index])
            }
            for entry in listed {
                // Unacknowledged uploads may or may not have landed, but never partially.
                let client = try #require(entry["client"] as? String)
                let index = try #require(Int(client.dropFirst()))
                let stored = try await survivor.client.get("/v1/federations/crash/rounds/0/uploads/\(client)")
                #expect(stored.body == files[index], "\(client) is partial")
            }
            #expect(listed.count >= acknowledgedNow.count)
        }
        #expect(await other.stop() == 0)
        #expect(await restarted.stop() == 0)
    }

    /// A burst of clients asking for a round's aggregate as soon as it is complete (with a cache,
    /// and without one, where nothing but joining a computation under way spares recomputing):
    /// every one gets the bytes a later request gets. Whether a request joins depends on timing;
    /// that joining gives the computation's bytes is tested on the store (StreamedComputationTests).
    @Test(arguments: DatabaseBackend.available, [true, false])
    func aBurstOfRequestsForAColdAggregateAllGetItsBytes(_ backend: DatabaseBackend, cached: Bool) async throws {
        let service = try await ServiceProcess.start(backend, arguments: cached ? [] : ["--aggregate-cache-bytes", "0"])
        for (index, client) in TestRound.random(seed: 91, ranks: [4, 8, 16]).enumerated() {
            let path = "/v1/federations/burst/rounds/0/uploads/c\(index)?rank=\(client.rank)&weight=\(client.weight)"
            #expect(try await service.client.request("PUT", path, body: try client.safetensors().bytes).statusCode == 201)
        }
        let path = "/v1/federations/burst/rounds/0/aggregate?dtype=F32"
        let answers = try await withThrowingTaskGroup(of: (Int, [UInt8]).self) { group in
            for _ in 0..<8 {
                group.addTask {
                    let answer = try await service.client.get(path)
                    return (answer.statusCode, answer.body)
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let later = try await service.client.get(path)
        #expect(later.statusCode == 200 && !later.body.isEmpty, "\(String(decoding: later.body.prefix(300), as: UTF8.self))")
        for (status, body) in answers { #expect(status == 200 && body == later.body) }
        #expect((1...9).contains(try await aggregations(service, once: 1)))
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func twoServerProcessesShareOneDatabase(_ backend: DatabaseBackend) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let first = try await ServiceProcess.start(database: database)
        let second = try await ServiceProcess.start(database: database)
        let clients = TestRound.random(seed: 44)
        try await withThrowingTaskGroup(of: Int.self) { group in
            for (index, participant) in clients.enumerated() {
                let service = index % 2 == 0 ? first : second
                let file = try participant.safetensors().bytes
                let path = "/v1/federations/shared/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)&weight=\(participant.weight)"
                group.addTask { try await service.client.request("PUT", path, body: file).statusCode }
            }
            for try await status in group { #expect(status == 201) }
        }
        let fromFirst = try await first.client.get("/v1/federations/shared/rounds/0/aggregate")
        let fromSecond = try await second.client.get("/v1/federations/shared/rounds/0/aggregate")
        #expect(fromFirst.statusCode == 200 && fromFirst.body == fromSecond.body)
        let round = try await second.client.get("/v1/federations/shared/rounds/0")
        #expect((round.json["uploads"] as? [[String: Any]])?.count == clients.count)
        #expect(await first.stop() == 0)
        #expect(await second.stop() == 0)
    }

    /// OpenBLAS picks its kernels by CPU family, and svd's bits follow them. Two servers on one
    /// database whose LAPACK runs different kernels (forced with OPENBLAS_CORETYPE; x86-64 names)
    /// give svd aggregates tags and digest records of their own, so neither answers the other's tag
    /// for its own bytes nor checks a recomputation against the other's record; the engine's own
    /// strategies, the same bits on every CPU, keep one tag and one record everywhere.
    @Test(.enabled(if: Self.runsOnX86)) func serversWhoseLAPACKKernelsDifferKeepSvdTagsApart() async throws {
        let database = try ServiceProcess.temporaryDatabase()
        var servers: [ServiceProcess] = []
        for kernels in ["Prescott", "Nehalem"] {
            servers.append(
                try await ServiceProcess.start(database: database, arguments: ["--aggregate-cache-bytes", "0"], environment: ["OPENBLAS_CORETYPE": kernels]))
        }
        for participant in TestRound.random(seed: 47) {
            let path = "/v1/federations/kernels/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)&weight=\(participant.weight)"
            #expect(try await servers[0].client.request("PUT", path, body: try participant.safetensors().bytes).statusCode == 201)
        }
        for strategy in AggregationStrategy.allCases {
            let path = "/v1/federations/kernels/rounds/0/aggregate?strategy=\(strategy.rawValue)"
            // From each server a first computation, then (once its digest is on record) a
            // recomputation checked against the record, which says so with Repr-Digest.
            var answers: [RawClient.Response] = []
            for (index, server) in servers.enumerated() {
                let answer = try await server.client.get(path)
                #expect(answer.statusCode == 200 && answer.header("Content-Length") == String(answer.body.count), "\(strategy) from server \(index)")
                let recomputedAgainstTheRecord = try await eventually {
                    let again = try await server.client.get(path)
                    return again.statusCode == 200 && again.body == answer.body && again.header("ETag") == answer.header("ETag")
                        && again.header("Repr-Digest") == ContentDigest.reprDigest(sha256Hex: ContentDigest.sha256Hex(answer.body))
                }
                #expect(recomputedAgainstTheRecord, "\(strategy) from server \(index)")
                answers.append(answer)
            }
            let (first, second) = (try #require(answers[0].header("ETag")), try #require(answers[1].header("ETag")))
            let conditional = try await servers[1].client.get(path, headers: [("If-None-Match", first)])
            if strategy == .svd {
                #expect(first != second && conditional.statusCode == 200)
            } else {
                #expect(first == second && answers[0].body == answers[1].body && conditional.statusCode == 304, "\(strategy)")
            }
        }
        for server in servers { #expect(await server.stop() == 0) }
    }

    static var runsOnX86: Bool {
        #if arch(x86_64)
            true
        #else
            false
        #endif
    }

    /// The ETag derives from the round's inputs, so a matching If-None-Match never needs computing,
    /// and the first computation streams. An aggregate computed once has its digest on record in the
    /// database: a server without a copy in memory (cache off, restarted) answers a HEAD without
    /// computing, and streams the identical body under the same ETag with its `Repr-Digest`.
    @Test(arguments: DatabaseBackend.available) func conditionalGetsNeedNoComputingAndARecordedDigestSurvivesARestart(_ backend: DatabaseBackend) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let uncached = try await ServiceProcess.start(database: database, arguments: ["--aggregate-cache-bytes", "0"])
        let uploads = try TestRound.random(seed: 46).map { participant in
            (
                path: "/v1/federations/digests/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)&weight=\(participant.weight)",
                bytes: try participant.safetensors().bytes
            )
        }
        for upload in uploads { #expect(try await uncached.client.request("PUT", upload.path, body: upload.bytes).statusCode == 201) }
        let path = "/v1/federations/digests/rounds/0/aggregate?strategy=zero_padding"
        let first = try await uncached.client.get(path)
        let etag = try #require(first.header("ETag"))
        let reprDigest = ContentDigest.reprDigest(sha256Hex: ContentDigest.sha256Hex(first.body))
        #expect(first.statusCode == 200 && first.header("Content-Length") == String(first.body.count) && first.header("Repr-Digest") == nil)
        #expect(try await uncached.client.get(path, headers: [("If-None-Match", etag)]).statusCode == 304)
        #expect(try await aggregations(uncached, once: 1) == 1, "the 304 needed no computing")
        // The digest is recorded just after the answer; from then on a HEAD computes nothing either.
        let answeredFromTheRecord = try await eventually {
            let before = try await aggregations(uncached)
            let head = try await uncached.client.request("HEAD", path)
            return try await aggregations(uncached) == before && head.header("Repr-Digest") == reprDigest
        }
        #expect(answeredFromTheRecord)
        #expect(await uncached.stop() == 0)

        // Another database with the same uploads: the same ETag for the same bytes.
        let elsewhere = try await ServiceProcess.start(database: try ServiceProcess.temporaryDatabase(backend))
        for upload in uploads { #expect(try await elsewhere.client.request("PUT", upload.path, body: upload.bytes).statusCode == 201) }
        let same = try await elsewhere.client.get(path)
        #expect(same.header("ETag") == etag && same.body == first.body)
        #expect(await elsewhere.stop() == 0)

        let restarted = try await ServiceProcess.start(database: database)
        #expect(try await restarted.client.get(path, headers: [("If-None-Match", etag)]).statusCode == 304)
        let head = try await restarted.client.request("HEAD", path)
        #expect(head.statusCode == 200 && head.header("ETag") == etag && head.header("Content-Length") == String(first.body.count) && head.body.isEmpty)
        #expect(head.header("Repr-Digest") == reprDigest)
        #expect(try await aggregations(restarted) == 0, "neither needed the aggregate")
        let streamed = try await restarted.client.get(path)
        #expect(streamed.statusCode == 200 && streamed.header("ETag") == etag && streamed.header("Content-Length") == String(first.body.count))
        #expect(streamed.header("Repr-Digest") == reprDigest)
        #expect(streamed.body == first.body)
        // Computed once while streaming, then served from memory.
        #expect(try await restarted.client.get(path).body == first.body)
        #expect(try await aggregations(restarted, once: 1) == 1)
        #expect(await restarted.stop() == 0)

        // A record the bytes do not match (written behind the server's back): the body is cut short
        // of its Content-Length, the server logs why and drops the record, and a GET computes afresh.
        try tamper(database, backend, "UPDATE aggregate_digests SET crc32 = (crc32 + 1) % 4294967296")
        let mismatched = try await ServiceProcess.start(database: database, arguments: ["--aggregate-cache-bytes", "0"])
        await #expect(throws: (any Error).self, "a truncated body") { _ = try await mismatched.client.get(path) }
        var recomputed: RawClient.Response?
        #expect(
            try await eventually {
                recomputed = try? await mismatched.client.get(path)
                return recomputed != nil
            })
        #expect(recomputed?.body == first.body && recomputed?.header("ETag") == etag)

        // A change to the round: the recorded digest no longer applies.
        let late = TestRound.random(seed: 47, ranks: [2])[0]
        #expect(
            try await mismatched.client.request("PUT", "/v1/federations/digests/rounds/0/uploads/zz-late?rank=2", body: try late.safetensors().bytes).statusCode
                == 201)
        let changed = try await mismatched.client.get(path, headers: [("If-None-Match", etag)])
        #expect(changed.statusCode == 200 && changed.header("ETag") != etag && changed.body != first.body)
        #expect(await mismatched.stop() == 0)
        #expect(mismatched.errorLog().contains("an aggregate stream failed after its head was sent"))
    }

    /// Runs SQL on the database behind the server's back: with Python's sqlite3, or psql.
    private func tamper(_ database: String, _ backend: DatabaseBackend, _ sql: String) throws {
        guard backend == .sqlite else {
            _ = try DatabaseBackend.psql(database, sql)
            return
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()", database, sql]
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
    }

    @Test(arguments: DatabaseBackend.available) func sigtermFinishesTheRequestInFlightAndExitsZero(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let big = try TestRound.random(seed: 5, ranks: [64])[0].safetensors().bytes
        // The upload is in flight once the server asks for its body (100 Continue); SIGTERM then,
        // and only then send the body.
        let (interim, response) = try await onOwnThread { [port = service.port] in
            let client = try RawClient(port: port, receiveTimeout: 60)
            try client.send(
                "PUT /v1/federations/f/rounds/0/uploads/a?rank=64 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(big.count)\r\nExpect: 100-continue\r\n\r\n")
            let interim = try client.readResponse()
            service.terminate()
            try client.send(big)
            return (interim.statusCode, try client.readResponse())
        }
        #expect(interim == 100)
        #expect(response.statusCode == 201 && response.header("Connection") == "close")
        #expect(await service.stop() == 0)
        let restarted = try await ServiceProcess.start(database: service.databasePath)
        #expect(try await restarted.client.get("/v1/federations/f/rounds/0/uploads/a").body == big, "the upload finished during shutdown is stored")
        #expect(await restarted.stop() == 0)
    }
}

/// The top-level openapi.yaml of this checkout.
private func openAPIDocumentPath(_ file: String = #filePath) -> String {
    URL(fileURLWithPath: file).deletingLastPathComponent().appendingPathComponent("../../openapi.yaml").standardized.path
}

@Suite struct OpenAPIContractTests {
    @Test func everyRouteIsInTheDocumentAndEveryPathIsARoute() throws {
        let service = try AggregatorService(
            configuration: {
                var configuration = ServiceConfiguration()
                configuration.database = try ServiceProcess.temporaryDatabase()
                return configuration
            }())
        let routes = Set(service.makeRouter().routes.map(\.pattern))
        let text = try String(contentsOfFile: openAPIDocumentPath(), encoding: .utf8)
        let documented = Set(text.split(separator: "\n").filter { $0.hasPrefix("  /") && $0.hasSuffix(":") }.map { String($0.dropFirst(2).dropLast()) })
        #expect(routes == documented)
        // Methods: each route's method appears under its path.
        for route in service.makeRouter().routes {
            let section = "\n" + text.components(separatedBy: "\n  \(route.pattern):\n")[1].components(separatedBy: "\n  /")[0]
            #expect(section.contains("\n    \(route.method.lowercased()):"), "\(route.method) \(route.pattern)")
        }
    }

    @Test func theDocumentIsValidOpenAPI31() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "python3", "-c",
            "import sys; from openapi_spec_validator import validate; from openapi_spec_validator.readers import read_from_filename; validate(read_from_filename(sys.argv[1])[0]); print('valid')",
            openAPIDocumentPath(),
        ]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        process.waitUntilExit()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 0 && text.contains("valid"), "\(text)")
    }
}

/// `lora_aggregator_aggregation_seconds_count` from `/metrics`, over every strategy: aggregates computed so far.
func aggregations(_ service: ServiceProcess) async throws -> Int {
    let metrics = String(decoding: try await service.client.get("/metrics").body, as: UTF8.self)
    let lines = metrics.split(separator: "\n").filter { $0.hasPrefix("lora_aggregator_aggregation_seconds_count{") }
    #expect(lines.count == AggregationStrategy.allCases.count)
    return try lines.reduce(0) { total, line in total + (try #require(Int(line.split(separator: " ")[1]))) }
}

/// The same, once at least `count` are counted: a streamed aggregation counts as its last byte goes
/// out, which may be just after the client has it (and has asked for the metrics).
func aggregations(_ service: ServiceProcess, once count: Int) async throws -> Int {
    var counted = 0
    _ = try await eventually {
        counted = try await aggregations(service)
        return counted >= count
    }
    return counted
}
