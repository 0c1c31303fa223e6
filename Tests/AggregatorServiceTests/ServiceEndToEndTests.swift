import Digests
import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

/// A problem+json answer (RFC 9457) with `status`; shared by the service suites.
func expectProblem(_ response: RawClient.Response, _ status: Int, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(response.statusCode == status, "\(response.text)", sourceLocation: sourceLocation)
    #expect(response.header("Content-Type") == "application/problem+json", sourceLocation: sourceLocation)
    let json = response.json
    #expect(
        json["status"] as? Int == status && json["title"] is String && json["detail"] is String
            && (json["type"] as? String)?.hasPrefix("urn:lora-aggregator:problem:") == true, "\(response.text)", sourceLocation: sourceLocation)
}

private func uploadPath(_ client: String, rank: Int, weight: Double = 1, round: Int = 1) -> String {
    "/v1/federations/fed/rounds/\(round)/uploads/\(client)?rank=\(rank)&weight=\(weight)"
}

@Suite(.serialized) struct ServiceEndToEndTests {
    @Test(arguments: DatabaseBackend.available, 0..<3)
    func randomRoundsUploadedCompressedMatchTheLiteralReference(_ backend: DatabaseBackend, seed: UInt64) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        var random = SeededGenerator(seed: 900 + seed)
        let clients = TestRound.random(seed: 700 + seed)
        for participant in clients.shuffled(using: &random) {
            let file = try participant.safetensors().bytes
            let coding = ContentCoding.allCases.randomElement(using: &random)!
            let headers = coding == .identity ? [] : [("Content-Encoding", coding.rawValue)]
            let response = try await client.request(
                "PUT", uploadPath(participant.id, rank: participant.rank, weight: participant.weight),
                headers: headers + [("Content-Type", "application/octet-stream")], body: coding.compress(file))
            #expect(response.statusCode == 201, "\(response.text)")
            #expect(response.json["sha256"] as? String == ContentDigest.sha256Hex(file))
            #expect(response.json["bytes"] as? Int == file.count)
        }
        let round = try await client.get("/v1/federations/fed/rounds/1")
        let globalRank = clients.map(\.rank).max()!
        #expect(round.json["max_rank"] as? Int == globalRank)
        #expect((round.json["uploads"] as? [[String: Any]])?.compactMap { $0["client"] as? String } == clients.map(\.id).sorted())

        for (strategy, padding) in [("replication", LiteralReference.Padding.replication), ("zero_padding", .zeros)] {
            let global = try await client.get("/v1/federations/fed/rounds/1/aggregate?strategy=\(strategy)")
            #expect(global.statusCode == 200)
            try expectClose(global.body, LiteralReference.aggregate(clients, padding: padding, rank: globalRank))
            for participant in clients {
                let own = try await client.get("/v1/federations/fed/rounds/1/aggregate/\(participant.id)?strategy=\(strategy)")
                try expectClose(own.body, LiteralReference.aggregate(clients, padding: padding, rank: participant.rank))
            }
        }
        #expect(await service.stop() == 0)
    }

    /// A client may tag a small module with a rank far above its size (40 000 on a 10 × 12 module, a
    /// 3.5 MB upload). hetlora then takes each norm from the product itself, not from r × r Gram
    /// matrices (12.8 GB each), and matches the literal reference; every other strategy answers too.
    @Test func aRankFarAboveTheModulesSizeIsAggregatedWithinTheUploadsOwnSize() async throws {
        let service = try await ServiceProcess.start()
        var random = SeededGenerator(seed: 31_500)
        let names = (TestModule.query.tensors(rank: 1)[0].0, TestModule.query.tensors(rank: 1)[1].0)
        let clients = [2, 40_000].enumerated().map { index, rank in
            func tensor(_ shape: [Int]) -> TestTensor {
                TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { _ in Double(Float.random(in: -1...1, using: &random)) })
            }
            return TestClient(
                id: "client-\(index)", rank: rank, weight: Double(index + 1), dtype: .f32,
                tensors: [names.0: tensor([rank, 12]), names.1: tensor([10, rank])])
        }
        for participant in clients {
            let path = "/v1/federations/wide/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)&weight=\(participant.weight)"
            #expect(try await service.client.request("PUT", path, body: try participant.safetensors().bytes).statusCode == 201)
        }
        let hetlora = try await service.client.get("/v1/federations/wide/rounds/0/aggregate?strategy=hetlora")
        #expect(hetlora.statusCode == 200)
        // The reference, literally (the general one pads slice by slice, too slow at this rank): each
        // client's norm from its dense 10 × 12 product, then zero padding weighted by the norms.
        let (out, n, rank) = (10, 12, 40_000)
        let norms = clients.map { client in
            let (a, b, r) = (client.tensors[names.0]!.values, client.tensors[names.1]!.values, client.rank)
            var squares = 0.0
            for o in 0..<out {
                for c in 0..<n {
                    var entry = 0.0
                    for j in 0..<r { entry += b[o * r + j] * a[j * n + c] }
                    squares += entry * entry
                }
            }
            return squares.squareRoot()
        }
        let total = norms.reduce(0, +)
        var (expectedA, expectedB) = ([Double](repeating: 0, count: rank * n), [Double](repeating: 0, count: out * rank))
        for (client, norm) in zip(clients, norms) {
            let (a, b, r) = (client.tensors[names.0]!.values, client.tensors[names.1]!.values, client.rank)
            for index in 0..<(r * n) { expectedA[index] += norm * a[index] / total }
            for o in 0..<out {
                for j in 0..<r { expectedB[o * rank + j] += norm * b[o * r + j] / total }
            }
        }
        try expectClose(
            hetlora.body, [names.0: TestTensor(shape: [rank, n], values: expectedA), names.1: TestTensor(shape: [out, rank], values: expectedB)])
        for strategy in AggregationStrategy.allCases where strategy != .hetlora {
            #expect(try await service.client.get("/v1/federations/wide/rounds/0/aggregate?strategy=\(strategy.rawValue)").statusCode == 200, "\(strategy)")
        }
        #expect(await service.stop() == 0)
    }

    private func expectClose(_ bytes: [UInt8], _ reference: [String: TestTensor], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let file = try SafetensorsFile(bytes: bytes)
        #expect(Set(file.tensors.map(\.name)) == Set(reference.keys), sourceLocation: sourceLocation)
        for tensor in file.tensors {
            let expected = try #require(reference[tensor.name])
            #expect(tensor.shape == expected.shape, sourceLocation: sourceLocation)
            let worst = zip(file.values(of: tensor), expected.values).map { abs($0 - $1) / (abs($1) + 1e-12) }.max() ?? 0
            #expect(worst <= 1e-6, "\(tensor.name): \(worst)", sourceLocation: sourceLocation)
        }
    }

    @Test(arguments: DatabaseBackend.available) func uploadsReplaceDeleteSealAndDownloadsWithETagsGzipAndHead(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        let first = try TestClient(id: "alice", rank: 4, weight: 2, dtype: .f32, tensors: TestRound.random(seed: 1, ranks: [4])[0].tensors).safetensors().bytes
        let second = try TestRound.random(seed: 2, ranks: [4])[0].safetensors().bytes
        #expect(try await client.request("PUT", uploadPath("alice", rank: 4), body: first).statusCode == 201)
        #expect(try await client.request("PUT", uploadPath("alice", rank: 4), body: second).statusCode == 200, "replaced")

        let download = try await client.get("/v1/federations/fed/rounds/1/uploads/alice")
        #expect(download.body == second)
        let etag = try #require(download.header("ETag"))
        #expect(etag == "\"\(ContentDigest.sha256Hex(second))\"")
        #expect(download.header("Content-Disposition") == "attachment; filename=\"adapter_model.safetensors\"")
        #expect(try await client.get("/v1/federations/fed/rounds/1/uploads/alice", headers: [("If-None-Match", etag)]).statusCode == 304)
        let head = try await client.request("HEAD", "/v1/federations/fed/rounds/1/uploads/alice")
        #expect(head.statusCode == 200 && head.header("Content-Length") == String(second.count) && head.body.isEmpty)
        // HEAD has the GET's header fields; the gzip'd length, known only by compressing, is left out.
        let zippedHead = try await client.request("HEAD", "/v1/federations/fed/rounds/1/uploads/alice", headers: [("Accept-Encoding", "gzip")])
        #expect(zippedHead.statusCode == 200 && zippedHead.header("Content-Encoding") == "gzip" && zippedHead.header("Content-Length") == nil)
        #expect(zippedHead.header("ETag") == "\"\(ContentDigest.sha256Hex(second))-gzip\"" && zippedHead.body.isEmpty)

        let aggregate = try await client.get("/v1/federations/fed/rounds/1/aggregate?dtype=BF16")
        let zipped = try await client.get("/v1/federations/fed/rounds/1/aggregate?dtype=BF16", headers: [("Accept-Encoding", "gzip")])
        #expect(zipped.header("Content-Encoding") == "gzip" && zipped.header("Vary") == "Accept-Encoding")
        #expect(try ContentDecoding.inflate(zipped.body, coding: "gzip", limit: 1 << 30) == aggregate.body)
        let metadata = try SafetensorsFile(bytes: aggregate.body).metadata
        #expect(metadata == ["format": "pt", "federation": "fed", "round": "1", "strategy": "replication", "rank": "4", "clients": "1"])
        // The first computation streams with its length, before its digest is known; the cached
        // answer has the same bytes under the same ETag, and carries the digest (RFC 9530) once it
        // is computed, just after the first answer.
        #expect(aggregate.header("Content-Length") == String(aggregate.body.count) && aggregate.header("Repr-Digest") == nil)
        let reprDigest = ContentDigest.reprDigest(sha256Hex: ContentDigest.sha256Hex(aggregate.body))
        let cachedWithItsDigest = try await eventually {
            let again = try await client.get("/v1/federations/fed/rounds/1/aggregate?dtype=BF16")
            #expect(again.body == aggregate.body && again.header("ETag") == aggregate.header("ETag"))
            #expect(again.header("Repr-Digest") == nil || again.header("Repr-Digest") == reprDigest)
            return again.header("Repr-Digest") == reprDigest
        }
        #expect(cachedWithItsDigest)
        #expect(try await aggregations(service, once: 1) == 1, "cached as soon as it was streamed, not once hashed")
        #expect(zipped.header("Repr-Digest") == nil, "the digest of the uncompressed bytes does not describe gzip'd ones")
        #expect(
            try await client.get("/v1/federations/fed/rounds/1/aggregate?dtype=BF16", headers: [("If-None-Match", aggregate.header("ETag") ?? "")]).statusCode
                == 304)

        #expect(try await client.request("DELETE", "/v1/federations/fed/rounds/1/uploads/alice").statusCode == 204)
        expectProblem(try await client.request("DELETE", "/v1/federations/fed/rounds/1/uploads/alice"), 404)
        expectProblem(try await client.get("/v1/federations/fed/rounds/1"), 404)

        #expect(try await client.request("PUT", uploadPath("bob", rank: 4), body: first).statusCode == 201)
        let sealed = try await client.request("POST", "/v1/federations/fed/rounds/1/seal")
        #expect(sealed.statusCode == 200 && sealed.json["sealed"] as? Bool == true)
        #expect(try await client.request("POST", "/v1/federations/fed/rounds/1/seal").statusCode == 200, "idempotent")
        expectProblem(try await client.request("PUT", uploadPath("carol", rank: 4), body: first), 409)
        expectProblem(try await client.request("DELETE", "/v1/federations/fed/rounds/1/uploads/bob"), 409)
        let list = try await client.get("/v1/federations/fed/rounds")
        #expect((list.json["rounds"] as? [[String: Any]])?.first?["sealed"] as? Bool == true)
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func zstdBodiesAndDownloads(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend, arguments: ["--max-upload-bytes", "200000"])
        let client = service.client
        let file = try TestRound.random(seed: 41, ranks: [4])[0].safetensors().bytes
        let zstd = ContentCoding.zstd.compress(file)
        #expect(zstd != file && zstd.count < file.count)
        #expect(try await client.request("PUT", uploadPath("alice", rank: 4), headers: [("Content-Encoding", "zstd")], body: zstd).statusCode == 201)
        #expect(try await client.get("/v1/federations/fed/rounds/1/uploads/alice").body == file)
        // Two frames are one body (RFC 8878 §3.1); a cut or corrupt stream, and a bomb, are refused.
        let half = file.count / 2
        let twoFrames = ContentCoding.zstd.compress(Array(file[..<half])) + ContentCoding.zstd.compress(Array(file[half...]))
        #expect(try await client.request("PUT", uploadPath("bob", rank: 4), headers: [("Content-Encoding", "zstd")], body: twoFrames).statusCode == 201)
        #expect(try await client.get("/v1/federations/fed/rounds/1/uploads/bob").body == file)
        expectProblem(
            try await client.request("PUT", uploadPath("carol", rank: 4), headers: [("Content-Encoding", "zstd")], body: Array(zstd.dropLast(5))), 400)
        expectProblem(
            try await client.request("PUT", uploadPath("carol", rank: 4), headers: [("Content-Encoding", "zstd")], body: Array(repeating: 7, count: 64)), 400)
        let bomb = ContentCoding.zstd.compress([UInt8](repeating: 0, count: 50_000_000))
        #expect(bomb.count < 200_000)
        expectProblem(try await client.request("PUT", uploadPath("carol", rank: 4), headers: [("Content-Encoding", "zstd")], body: bomb), 413)
        #expect(try await client.get("/v1/federations/fed/rounds/1/uploads/carol").statusCode == 404, "nothing stored")

        // Downloads: zstd when named, preferred over gzip at equal weight; the ETag names the coding.
        let path = "/v1/federations/fed/rounds/1/aggregate"
        let plain = try await client.get(path)
        for (accept, coding) in [("zstd", "zstd"), ("gzip, zstd", "zstd"), ("gzip;q=1, zstd;q=0.5", "gzip"), ("zstd;q=0", nil), ("*", nil)]
            as [(String, String?)]
        {
            let response = try await client.get(path, headers: [("Accept-Encoding", accept)])
            #expect(response.header("Content-Encoding") == coding, "\(accept)")
            let decoded = try coding.map { try ContentDecoding.inflate(response.body, coding: $0, limit: 1 << 30) } ?? response.body
            #expect(decoded == plain.body, "\(accept)")
            let etag = try #require(response.header("ETag"))
            #expect(etag.hasSuffix(coding.map { "-\($0)\"" } ?? "\""), "\(accept): \(etag)")
            // The 304 and the HEAD carry what the 200 does, Vary included.
            let notModified = try await client.get(path, headers: [("Accept-Encoding", accept), ("If-None-Match", etag)])
            #expect(notModified.statusCode == 304 && notModified.header("Vary") == "Accept-Encoding" && notModified.header("ETag") == etag, "\(accept)")
            let head = try await client.request("HEAD", path, headers: [("Accept-Encoding", accept)])
            #expect(head.header("Content-Encoding") == coding && head.header("ETag") == etag && head.header("Vary") == "Accept-Encoding", "\(accept)")
        }
        // A compressed first computation streams too (chunked: its length is known only at its end),
        // and the answer from the cache under the same ETag is the same bytes.
        for (coding, dtype) in [("zstd", "F16"), ("gzip", "BF16")] {
            let fresh = "\(path)?strategy=svd&dtype=\(dtype)"
            let streamed = try await client.get(fresh, headers: [("Accept-Encoding", coding)])
            #expect(streamed.header("Transfer-Encoding") == "chunked" && streamed.header("Content-Length") == nil, "\(coding)")
            #expect(streamed.header("Content-Encoding") == coding && streamed.header("Repr-Digest") == nil, "\(coding)")
            let cached = try await client.get(fresh, headers: [("Accept-Encoding", coding)])
            #expect(cached.header("Content-Length") == String(cached.body.count), "\(coding)")
            #expect(cached.body == streamed.body && cached.header("ETag") == streamed.header("ETag"), "\(coding)")
            #expect(try ContentDecoding.inflate(streamed.body, coding: coding, limit: 1 << 30) == (try await client.get(fresh)).body, "\(coding)")
        }
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func everyRefusalIsAProblemAndLeavesTheEarlierUploadByteIdentical(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend, arguments: ["--max-upload-bytes", "200000"])
        let client = service.client
        let good = try TestRound.random(seed: 3, ranks: [8])[0].safetensors().bytes
        let stored = try await client.request("PUT", uploadPath("alice", rank: 8), body: good)
        #expect(stored.statusCode == 201)

        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 4), body: good), 422)  // rank tag wrong
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8), body: Array(good.prefix(good.count - 3))), 400)  // truncated file
        // A corrupt stream.
        expectProblem(
            try await client.request(
                "PUT", uploadPath("alice", rank: 8), headers: [("Content-Encoding", "gzip")], body: Array(ContentCoding.gzip.compress(good).dropLast(9))), 400)
        let bomb = ContentCoding.gzip.compress([UInt8](repeating: 0, count: 50_000_000), level: 9)
        #expect(bomb.count < 200_000)
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8), headers: [("Content-Encoding", "gzip")], body: bomb), 413)
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8), body: [UInt8](repeating: 1, count: 200_001)), 413)
        let unsupported = try await client.request("PUT", uploadPath("alice", rank: 8), headers: [("Content-Encoding", "br")], body: good)
        expectProblem(unsupported, 415)
        #expect(unsupported.header("Accept-Encoding") == "gzip, deflate, zstd, identity")
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8), headers: [("Content-Type", "application/json")], body: good), 415)
        expectProblem(try await client.request("PUT", "/v1/federations/fed/rounds/1/uploads/alice?weight=2", body: good), 400)  // rank missing
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8, weight: -1), body: good), 400)
        expectProblem(try await client.request("PUT", uploadPath("bad%20id", rank: 8), body: good), 400)
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8, round: -1), body: good), 400)
        let wrongShape = try TestClient(
            id: "x", rank: 8, weight: 1, dtype: .f32,
            tensors: [
                "base_model.model.layers.0.attn.q_proj.lora_A.weight": TestTensor(shape: [8, 13], values: Array(repeating: 0.5, count: 104)),
                "base_model.model.layers.0.attn.q_proj.lora_B.weight": TestTensor(shape: [10, 8], values: Array(repeating: 0.5, count: 80)),
            ]
        ).safetensors().bytes
        let other = try await client.request("PUT", uploadPath("bob", rank: 8), body: wrongShape)
        if TestRound.random(seed: 3, ranks: [8])[0].tensors["base_model.model.layers.0.attn.q_proj.lora_A.weight"] != nil {
            expectProblem(other, 422)  // shape disagrees with alice's q_proj apart from the rank axis
        }
        var nonFinite = try SafetensorsFile(bytes: good)
        let tensor = nonFinite.tensors.first { TensorRole(tensorName: $0.name).factor == .a }!
        var poisoned = good
        poisoned.replaceSubrange(tensor.byteRange.lowerBound..<(tensor.byteRange.lowerBound + tensor.dtype.byteWidth), with: tensor.dtype.encode([.nan]))
        nonFinite = try SafetensorsFile(bytes: poisoned)
        expectProblem(try await client.request("PUT", uploadPath("alice", rank: 8), body: nonFinite.bytes), 422)

        expectProblem(try await client.get("/v1/federations/fed/rounds/1/aggregate?rank=9"), 422)
        expectProblem(try await client.get("/v1/federations/fed/rounds/1/aggregate?strategy=mean"), 400)
        expectProblem(try await client.get("/v1/federations/fed/rounds/1/aggregate?dtype=F64"), 400)
        expectProblem(try await client.get("/v1/federations/fed/rounds/2/aggregate"), 404)
        expectProblem(try await client.get("/v1/federations/fed/rounds/1/aggregate/nobody"), 404)
        expectProblem(try await client.get("/v1/nowhere"), 404)
        let wrongMethod = try await client.request("PATCH", "/v1/federations/fed/rounds/1/uploads/alice")
        expectProblem(wrongMethod, 405)
        #expect(wrongMethod.header("Allow") == "DELETE, GET, HEAD, PUT")

        let after = try await client.get("/v1/federations/fed/rounds/1/uploads/alice")
        #expect(after.body == good, "every refusal left the earlier upload byte-identical")
        #expect(after.header("ETag") == "\"\(stored.json["sha256"] as? String ?? "")\"")
        #expect(await service.stop() == 0)
    }

    @Test func healthMetricsAndTheOpenAPIDocument() async throws {
        let service = try await ServiceProcess.start()
        let client = service.client
        #expect(try await client.get("/healthz").text == #"{"status":"ok"}"#)
        _ = try await client.get("/v1/federations/fed/rounds/1")
        let metrics = try await client.get("/metrics").text
        #expect(metrics.contains(#"lora_aggregator_requests_total{route="/healthz",method="GET",status="200"} 1"#))
        #expect(metrics.contains(#"lora_aggregator_requests_total{route="/v1/federations/{federation}/rounds/{round}",method="GET",status="404"} 1"#))
        #expect(metrics.contains("lora_aggregator_uploads_stored_total 0"))
        let document = try await client.get("/openapi.yaml")
        #expect(document.header("Content-Type") == "application/yaml")
        #expect(document.text == OpenAPIDocument.text && document.text.hasPrefix("openapi: 3.1"))
        #expect(await service.stop() == 0)
    }
}
