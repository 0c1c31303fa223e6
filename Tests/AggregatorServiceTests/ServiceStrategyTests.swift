import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

/// hetlora and svd through every path of the real server: the aggregate and each client's download,
/// HEAD, ETag and 304, gzip, the digest record (a second process with no cache), a lower rank cut
/// from the cached aggregate, chaining, and metrics by strategy. Their numbers are checked against
/// references in LoRAAdaptersTests and scripts/tests/test_strategies.py (numpy).
@Suite(.serialized) struct ServiceStrategyTests {
    @Test(arguments: DatabaseBackend.available, [AggregationStrategy.hetlora, .svd])
    func everyPathServesTheStrategy(_ backend: DatabaseBackend, _ strategy: AggregationStrategy) async throws {
        let database = try ServiceProcess.temporaryDatabase(backend)
        let service = try await ServiceProcess.start(database: database)
        let client = service.client
        let clients = TestRound.randomScaled(seed: 31_000)
        for participant in clients {
            let body = try participant.safetensors().bytes
            let alpha = participant.loraAlpha.map { "&lora_alpha=\($0)" } ?? ""
            let response = try await client.request(
                "PUT", "/v1/federations/s/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)\(alpha)&use_rslora=\(participant.useRSLoRA)", body: body)
            // randomScaled clients may carry rank patterns a query cannot say: those are uploaded with their config elsewhere.
            if response.statusCode != 201 { #expect(!participant.rankPattern.isEmpty || !participant.alphaPattern.isEmpty, "\(response.text)") }
        }
        let path = "/v1/federations/s/rounds/0/aggregate?strategy=\(strategy.rawValue)"
        let full = try await client.get(path)
        #expect(full.statusCode == 200 && full.header("Content-Type") == "application/octet-stream")
        let file = try SafetensorsFile(bytes: full.body)
        #expect(file.metadata["strategy"] == strategy.rawValue)
        let etag = try #require(full.header("ETag"))
        #expect(try await client.get(path, headers: [("If-None-Match", etag)]).statusCode == 304)
        let head = try await client.request("HEAD", path)
        #expect(head.header("ETag") == etag && head.header("Content-Length") == String(full.body.count) && head.body.isEmpty)
        let zipped = try await client.get(path, headers: [("Accept-Encoding", "gzip")])
        #expect(try ContentDecoding.inflate(zipped.body, coding: "gzip", limit: 1 << 30) == full.body)
        // A lower rank is cut from the cached aggregate; a second process without a cache computes it afresh.
        let globalRank = try #require(Int(file.metadata["rank"] ?? ""))
        let lower = max(1, globalRank / 2)
        let cut = try await client.get(path + "&rank=\(lower)")
        let uncached = try await ServiceProcess.start(database: database, arguments: ["--aggregate-cache-bytes", "0"])
        #expect(try await uncached.client.get(path + "&rank=\(lower)").body == cut.body, "the cut equals the computation")
        #expect(try await uncached.client.get(path).body == full.body, "recomputed, checked against the digest on record")
        #expect(await uncached.stop() == 0)
        // Each client's own download at its ranks.
        let uploaded = (try await client.get("/v1/federations/s/rounds/0").json["uploads"] as? [[String: Any]])?.compactMap { $0["client"] as? String } ?? []
        for participant in clients where uploaded.contains(participant.id) {
            let own = try SafetensorsFile(
                bytes: try await client.get("/v1/federations/s/rounds/0/aggregate/\(participant.id)?strategy=\(strategy.rawValue)").body)
            for tensor in own.tensors {
                if let rank = TensorRole(tensorName: tensor.name).rank(of: tensor.shape) {
                    #expect(rank <= participant.rank(ofModule: TensorRole.moduleName(ofTensor: tensor.name)!))
                }
            }
        }
        let metrics = try await client.get("/metrics").text
        #expect(metrics.contains("lora_aggregator_aggregation_seconds_count{strategy=\"\(strategy.rawValue)\"}"))
        #expect(!metrics.contains("lora_aggregator_aggregation_seconds_count{strategy=\"\(strategy.rawValue)\"} 0\n"))
        // Chained with this strategy, round 1 starts from this aggregate.
        #expect(
            try await client.request(
                "PUT", "/v1/federations/s", headers: [("Content-Type", "application/json")],
                body: Array(#"{"strategy":"\#(strategy.rawValue)","chain":true}"#.utf8)
            )
            .statusCode == 201)
        #expect(try await client.request("POST", "/v1/federations/s/rounds/0/seal").statusCode == 200)
        #expect(try await client.get("/v1/federations/s/rounds/1/base").body == full.body)
        #expect(await service.stop() == 0)
    }
}
