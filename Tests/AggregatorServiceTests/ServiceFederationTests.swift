import Digests
import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

/// Federations that run themselves, through the real server (openapi.yaml, "Federation"): settings,
/// the default strategy, chaining, quorum with grace, max_uploads, timeouts, deadlines across
/// restarts and two processes sealing one round. Time is only a lower bound here: every wait is for
/// an event, with its bounds derived from clocks read around the requests.
@Suite(.serialized) struct ServiceFederationTests {
    private static func adapter(seed: UInt64, rank: Int) throws -> [UInt8] {
        try TestClient(
            id: "x", rank: rank, weight: 1, dtype: .f32,
            tensors: TestRound.random(seed: 1, ranks: [rank])[0].tensors.mapValues { tensor in
                TestTensor(shape: tensor.shape, values: tensor.values.enumerated().map { Double(($0.offset + Int(seed)) % 13) / 8 })
            }
        ).safetensors().bytes
    }

    private static func upload(_ client: ServiceClient, _ federation: String, _ round: Int, _ id: String, rank: Int = 4) async throws -> Int {
        try await client.request(
            "PUT", "/v1/federations/\(federation)/rounds/\(round)/uploads/\(id)?rank=\(rank)", body: adapter(seed: UInt64(id.utf8.count), rank: rank)
        )
        .statusCode
    }

    private static func settings(_ client: ServiceClient, _ federation: String, _ json: String) async throws -> RawClient.Response {
        try await client.request("PUT", "/v1/federations/\(federation)", headers: [("Content-Type", "application/json")], body: Array(json.utf8))
    }

    private static func round(_ client: ServiceClient, _ federation: String, _ round: Int) async throws -> [String: Any] {
        try await client.get("/v1/federations/\(federation)/rounds/\(round)").json
    }

    @Test(arguments: DatabaseBackend.available) func settingsAreValidatedStoredAndShown(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        let fresh = try await client.get("/v1/federations/f").json
        #expect((fresh["settings"] as? [String: Any])?["strategy"] as? String == "replication" && fresh["current_round"] as? Int == 0)
        let put = try await Self.settings(
            client, "f", #"{"strategy":"zero_padding","chain":true,"quorum":{"min_uploads":3,"grace_seconds":30},"round_timeout_seconds":600}"#)
        #expect(put.statusCode == 201, "\(put.text)")
        let settings = try #require(try await client.get("/v1/federations/f").json["settings"] as? [String: Any])
        #expect(settings["strategy"] as? String == "zero_padding" && settings["chain"] as? Bool == true && settings["round_timeout_seconds"] as? Int == 600)
        let quorum = try #require(settings["quorum"] as? [String: Any])
        #expect(quorum["min_uploads"] as? Int == 3 && quorum["grace_seconds"] as? Int == 30 && quorum["max_uploads"] is NSNull)
        #expect(try await Self.settings(client, "f", "{}").statusCode == 200)
        for (body, status, reason) in [
            (#"{"strategy":"median"}"#, 422, "'strategy' must be one of"),
            (#"{"chains":true}"#, 422, "unknown member 'chains'"),
            (#"{"quorum":{"min_uploads":3,"max_uploads":2}}"#, 422, "'quorum.max_uploads' must be at least"),
            (#"{"quorum":{"min_uploads":0}}"#, 422, "'quorum.min_uploads'"),
            (#"{"quorum":{"min_uploads":1.5}}"#, 422, "'quorum.min_uploads'"),
            (#"{"quorum":{"grace_seconds":5}}"#, 422, "min_uploads or max_uploads"),
            (#"{"quorum":{"min_uploads":2,"extra":1}}"#, 422, "unknown member 'quorum.extra'"),
            (#"{"round_timeout_seconds":0}"#, 422, "'round_timeout_seconds'"),
            (#"{"chain":"yes"}"#, 422, "'chain' must be true or false"),
            (#"{"strategy":null}"#, 422, "'strategy' must be one of"),
            (#"[1]"#, 400, "JSON object"),
            (#"{"#, 400, "JSON object"),
        ] {
            let response = try await Self.settings(client, "f", body)
            expectProblem(response, status)
            #expect((response.json["detail"] as? String)?.contains(reason) == true, "\(body): \(response.text)")
        }
        #expect(
            (try await client.get("/v1/federations/f").json["settings"] as? [String: Any])?["strategy"] as? String == "replication", "refusals change nothing")
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func theFederationsStrategyIsTheDefaultAndChainingCarriesTheAggregateForward(_ backend: DatabaseBackend)
        async throws
    {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        #expect(try await Self.settings(client, "f", #"{"strategy":"zero_padding","chain":true}"#).statusCode == 201)
        #expect(try await Self.upload(client, "f", 0, "alice", rank: 2) == 201)
        #expect(try await Self.upload(client, "f", 0, "bob", rank: 8) == 201)
        let byDefault = try await client.get("/v1/federations/f/rounds/0/aggregate")
        #expect(byDefault.body == (try await client.get("/v1/federations/f/rounds/0/aggregate?strategy=zero_padding")).body)
        #expect(byDefault.body != (try await client.get("/v1/federations/f/rounds/0/aggregate?strategy=replication")).body)

        let sealed = try await client.request("POST", "/v1/federations/f/rounds/0/seal")
        #expect(sealed.json["sealed_by"] as? String == "request")
        // Round 1 starts from round 0's aggregate, byte for byte.
        let next = try await Self.round(client, "f", 1)
        let base = try #require(next["base"] as? [String: Any])
        #expect(base["source"] as? String == "chain" && base["rank"] as? Int == 8 && next["max_rank"] as? Int == 8)
        let chained = try await client.get("/v1/federations/f/rounds/1/base")
        #expect(chained.body == byDefault.body && chained.header("ETag") == "\"\(ContentDigest.sha256Hex(byDefault.body))\"")
        #expect(try await client.get("/v1/federations/f").json["current_round"] as? Int == 1)
        // A round with only its base has a report (404 only like the round), with no module yet.
        let emptyReport = try await client.get("/v1/federations/f/rounds/1/report")
        #expect(emptyReport.statusCode == 200 && (emptyReport.json["modules"] as? [Any])?.isEmpty == true, "\(emptyReport.text)")
        expectProblem(try await client.get("/v1/federations/f/rounds/7/report"), 404)
        // A rank-2 client of round 1 gets its slices from the base; round 1's aggregate keeps the rest.
        let alicesStart = try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/1/base?rank=2").body)
        #expect(alicesStart.tensors.allSatisfy { TensorRole(tensorName: $0.name).rank(of: $0.shape).map { $0 <= 2 } ?? true })
        #expect(try await Self.upload(client, "f", 1, "alice", rank: 2) == 201)
        let replicated = try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/1/aggregate?strategy=replication").body)
        let previous = try SafetensorsFile(bytes: byDefault.body)
        let name = try #require(previous.tensors.first { $0.name.hasSuffix("lora_A.weight") }?.name)
        let width = previous.tensor(named: name)!.shape[1]
        #expect(
            Array(replicated.values(of: replicated.tensor(named: name)!)[(2 * width)...])
                == Array(previous.values(of: previous.tensor(named: name)!)[(2 * width)...]))
        // Sealing again neither seals nor chains twice; a round that already has a base keeps it.
        #expect(try await client.request("POST", "/v1/federations/f/rounds/0/seal").statusCode == 200)
        #expect(try await client.get("/v1/federations/f/rounds/1/base").body == byDefault.body)
        #expect(try await client.get("/metrics").text.contains("lora_aggregator_rounds_sealed_total{reason=\"request\"} 1"))
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func aQuorumSealsAfterItsGracePeriodAndMaxUploadsAtOnce(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        let grace = 2.0
        #expect(try await Self.settings(client, "q", #"{"quorum":{"min_uploads":2,"grace_seconds":\#(grace)}}"#).statusCode == 201)
        #expect(try await Self.upload(client, "q", 0, "a") == 201)
        let quorumRequested = Date().timeIntervalSince1970
        #expect(try await Self.upload(client, "q", 0, "b") == 201)
        let checked = Date().timeIntervalSince1970
        let status = try await Self.round(client, "q", 0)
        // The deadline is at least `grace` after the request that reached the quorum was sent.
        if checked < quorumRequested + grace { #expect(status["sealed"] as? Bool == false, "sealed before its grace period") }
        // A straggler within the grace period counts; one after it is refused.
        let straggler = try await Self.upload(client, "q", 0, "c")
        #expect(straggler == 201 || straggler == 409)
        #expect(try await eventually { try await Self.round(client, "q", 0)["sealed_by"] as? String == "quorum" })
        let uploads = (try await Self.round(client, "q", 0)["uploads"] as? [[String: Any]])?.compactMap { $0["client"] as? String }
        #expect(uploads == (straggler == 201 ? ["a", "b", "c"] : ["a", "b"]))

        #expect(try await Self.settings(client, "m", #"{"quorum":{"max_uploads":2}}"#).statusCode == 201)
        #expect(try await Self.upload(client, "m", 0, "a") == 201)
        #expect(try await Self.round(client, "m", 0)["sealed"] as? Bool == false)
        #expect(try await Self.upload(client, "m", 0, "b") == 201)
        #expect(try await Self.round(client, "m", 0)["sealed_by"] as? String == "max_uploads", "sealed by the upload that reached it")
        #expect(try await Self.upload(client, "m", 0, "c") == 409)
        let metrics = try await client.get("/metrics").text
        #expect(metrics.contains("lora_aggregator_rounds_sealed_total{reason=\"quorum\"} 1") && metrics.contains("{reason=\"max_uploads\"} 1"))
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func aTimeoutSealsARoundWithItsQuorumAndFlagsOneWithout(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        // The quorum's grace is far away: only the timeout can seal these rounds.
        #expect(try await Self.settings(client, "t", #"{"quorum":{"min_uploads":2,"grace_seconds":3600},"round_timeout_seconds":1}"#).statusCode == 201)
        #expect(try await Self.upload(client, "t", 0, "a") == 201)
        #expect(try await Self.upload(client, "t", 0, "b") == 201)
        #expect(try await Self.upload(client, "t", 1, "a") == 201)
        #expect(try await eventually { try await Self.round(client, "t", 0)["sealed_by"] as? String == "timeout" })
        #expect(try await eventually { try await Self.round(client, "t", 1)["deadline_missed"] as? Bool == true })
        let missed = try await Self.round(client, "t", 1)
        #expect(missed["sealed"] as? Bool == false && missed["sealed_by"] is NSNull)
        #expect(try await Self.upload(client, "t", 1, "b") == 201, "a round past its deadline stays open")
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available, [false, true])
    func aDeadlineOutlivesTheServer(_ backend: DatabaseBackend, killed: Bool) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let first = try await ServiceProcess.start(database: database)
        #expect(try await Self.settings(first.client, "r", #"{"round_timeout_seconds":1,"chain":true}"#).statusCode == 201)
        #expect(try await Self.upload(first.client, "r", 0, "a") == 201)
        if killed { await first.kill() } else { #expect(await first.stop() == 0) }
        let second = try await ServiceProcess.start(database: database)
        #expect(try await eventually { try await Self.round(second.client, "r", 0)["sealed_by"] as? String == "timeout" })
        #expect(((try await Self.round(second.client, "r", 1))["base"] as? [String: Any])?["source"] as? String == "chain")
        #expect(await second.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func twoProcessesOnOneDatabaseSealAndChainARoundOnce(_ backend: DatabaseBackend) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let one = try await ServiceProcess.start(database: database)
        let other = try await ServiceProcess.start(database: database)
        #expect(try await Self.settings(one.client, "p", #"{"chain":true,"round_timeout_seconds":2}"#).statusCode == 201)
        // Round 0: both processes know its deadline (the other reads it when it next writes).
        #expect(try await Self.upload(one.client, "p", 0, "a") == 201)
        #expect(try await Self.upload(other.client, "p", 0, "b") == 201)
        #expect(try await eventually { try await Self.round(one.client, "p", 0)["sealed_by"] as? String == "timeout" })
        // Round 1 (chained from round 0): both seal it by request at the same time.
        #expect(try await Self.upload(one.client, "p", 1, "a") == 201)
        let (first, second) = try await (
            { try await one.client.request("POST", "/v1/federations/p/rounds/1/seal") }(),
            { try await other.client.request("POST", "/v1/federations/p/rounds/1/seal") }()
        )
        #expect(first.statusCode == 200 && second.statusCode == 200)
        func sealed(_ reason: String) async throws -> Int {
            var total = 0
            for service in [one, other] {
                let line = try await service.client.get("/metrics").text.split(separator: "\n").first {
                    $0.hasPrefix("lora_aggregator_rounds_sealed_total{reason=\"\(reason)\"}")
                }
                total += Int(line?.split(separator: " ").last ?? "") ?? -100
            }
            return total
        }
        #expect(try await sealed("timeout") == 1, "round 0 sealed once, by one process")
        #expect(try await sealed("request") == 1, "round 1 sealed once, by one process")
        #expect(((try await Self.round(one.client, "p", 1))["base"] as? [String: Any])?["source"] as? String == "chain")
        #expect(((try await Self.round(one.client, "p", 2))["base"] as? [String: Any])?["source"] as? String == "chain")
        #expect(await one.stop() == 0)
        #expect(await other.stop() == 0)
    }
}
