import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

/// Round bases through the real server (openapi.yaml, "Round base"): stored folded, read back cut
/// and unfolded, used for the slices no upload owns, refused where they cannot apply.
@Suite(.serialized) struct ServiceBaseTests {
    private static let a = "base_model.model.layers.0.attn.q_proj.lora_A.weight"
    private static let b = "base_model.model.layers.0.attn.q_proj.lora_B.weight"

    /// A q_proj adapter of `rank` whose slice j holds `value + j` everywhere (A `[r, 12]`, B `[10, r]`).
    private static func adapter(rank: Int, value: Double) throws -> [UInt8] {
        let a = TestTensor(shape: [rank, 12], values: (0..<rank * 12).map { value + Double($0 / 12) })
        let b = TestTensor(shape: [10, rank], values: (0..<10 * rank).map { value + Double($0 % rank) })
        return try TestClient(id: "x", rank: rank, weight: 1, dtype: .f32, tensors: [Self.a: a, Self.b: b]).safetensors().bytes
    }

    /// Slice j of a tensor of the downloaded file, along its rank axis.
    private static func slice(_ bytes: [UInt8], _ name: String, _ j: Int) throws -> [Double] {
        let file = try SafetensorsFile(bytes: bytes)
        let tensor = try #require(file.tensor(named: name))
        let values = file.values(of: tensor)
        return name == Self.a ? Array(values[(j * 12)..<((j + 1) * 12)]) : stride(from: j, to: values.count, by: tensor.shape[1]).map { values[$0] }
    }

    @Test(arguments: DatabaseBackend.available) func aBaseIsStoredFoldedAndFillsTheSlicesNoUploadOwns(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        let basePath = "/v1/federations/f/rounds/0/base"
        expectProblem(try await client.get(basePath), 404)
        // Sent at lora_alpha 32, rank 8: scale 4, so it is held times √4 = 2.
        let put = try await client.request("PUT", basePath + "?rank=8&lora_alpha=32", body: try Self.adapter(rank: 8, value: 1))
        #expect(put.statusCode == 201 && put.json["rank"] as? Int == 8 && put.json["source"] as? String == "upload", "\(put.text)")
        let round = try await client.get("/v1/federations/f/rounds/0")
        #expect((round.json["base"] as? [String: Any])?["rank"] as? Int == 8 && round.json["max_rank"] as? Int == 8, "\(round.text)")
        let held = try await client.get(basePath)
        #expect(try Self.slice(held.body, Self.a, 5) == Array(repeating: 12, count: 12), "(1 + 5) · 2")
        // Cut to rank 4 and unfolded to lora_alpha 16 at rank 4 (scale 4 again): the values as sent.
        let unfolded = try await client.get(basePath + "?rank=4&lora_alpha=16")
        #expect(try SafetensorsFile(bytes: unfolded.body).tensor(named: Self.b)?.shape == [10, 4])
        #expect(try Self.slice(unfolded.body, Self.b, 3) == Array(repeating: 4, count: 10))
        #expect(try await client.get(basePath, headers: [("If-None-Match", held.header("ETag") ?? "")]).statusCode == 304)
        #expect(try await client.request("PUT", basePath + "?rank=8", body: try Self.adapter(rank: 8, value: 1)).statusCode == 200, "replaced")

        // A rank-2 upload owns slices 0 and 1; under replication slices 2...7 are the base's, under zero padding zeros.
        #expect(
            try await client.request("PUT", "/v1/federations/f/rounds/0/uploads/alice?rank=2", body: try Self.adapter(rank: 2, value: 100)).statusCode == 201)
        let replication = try await client.get("/v1/federations/f/rounds/0/aggregate")
        #expect(try Self.slice(replication.body, Self.a, 1) == Array(repeating: 101, count: 12))
        #expect(try Self.slice(replication.body, Self.a, 7) == Array(repeating: 8, count: 12))
        let zeroPadding = try await client.get("/v1/federations/f/rounds/0/aggregate?strategy=zero_padding")
        #expect(try Self.slice(zeroPadding.body, Self.b, 7) == Array(repeating: 0, count: 10))
        // alice's own download is her two slices.
        #expect(try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/0/aggregate/alice").body).tensor(named: Self.a)?.shape == [2, 12])

        // Refusals: a shape that disagrees either way, a malformed body; nothing changes.
        let wrongShape = try TestClient(
            id: "x", rank: 8, weight: 1, dtype: .f32,
            tensors: [
                Self.a: TestTensor(shape: [8, 13], values: Array(repeating: 1, count: 104)),
                Self.b: TestTensor(shape: [10, 8], values: Array(repeating: 1, count: 80)),
            ]
        ).safetensors().bytes
        expectProblem(try await client.request("PUT", basePath + "?rank=8", body: wrongShape), 422)
        expectProblem(try await client.request("PUT", "/v1/federations/f/rounds/0/uploads/bob?rank=8", body: wrongShape), 422)
        expectProblem(try await client.request("PUT", basePath + "?rank=8", body: [1, 2, 3]), 400)
        expectProblem(try await client.request("PUT", basePath + "?rank=8&weight=2", body: try Self.adapter(rank: 8, value: 1)), 400)
        #expect(try await client.get("/v1/federations/f/rounds/0/aggregate").body == replication.body)

        // Deleting the base gives the slices back to zeros; a sealed round refuses base changes.
        #expect(try await client.request("DELETE", basePath).statusCode == 204)
        expectProblem(try await client.request("DELETE", basePath), 404)
        #expect(try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/0/aggregate").body).tensor(named: Self.a)?.shape == [2, 12])
        #expect(try await client.request("POST", "/v1/federations/f/rounds/0/seal").statusCode == 200)
        expectProblem(try await client.request("PUT", basePath + "?rank=8", body: try Self.adapter(rank: 8, value: 1)), 409)
        expectProblem(try await client.request("DELETE", basePath), 409)
        #expect(await service.stop() == 0)
    }
}
