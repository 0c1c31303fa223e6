import Digests
import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AggregatorService

/// PEFT scales and per-module ranks through the real server: both upload forms, aggregates unfolded
/// to a scale, each client's download at its own ranks and scales, and every refusal storing nothing.
@Suite(.serialized) struct ServicePEFTUploadTests {
    private static let boundary = "lora-aggregator-test-boundary"

    /// `adapter_config.json` as PEFT's `save_pretrained` writes the members that matter.
    private static func configJSON(_ client: TestClient) -> [UInt8] {
        func object<Value>(_ entries: [(String, Value)]) -> String { "{" + entries.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}" }
        let alpha = client.loraAlpha ?? Double(client.rank)
        return Array(
            """
            {"peft_type": "LORA", "r": \(client.rank), "lora_alpha": \(alpha), "use_rslora": \(client.useRSLoRA), "target_modules": ["q_proj", "v_proj"],
             "rank_pattern": \(object(client.rankPattern)), "alpha_pattern": \(object(client.alphaPattern))}
            """.utf8)
    }

    private static func multipart(model: [UInt8], config: [UInt8]?, extraPart: Bool = false) -> [UInt8] {
        var body: [UInt8] = []
        func part(_ name: String, _ bytes: [UInt8]) {
            body += Array("--\(boundary)\r\nContent-Disposition: form-data; name=\"\(name)\"; filename=\"\(name)\"\r\n\r\n".utf8) + bytes + Array("\r\n".utf8)
        }
        part("adapter_model.safetensors", model)
        if let config { part("adapter_config.json", config) }
        if extraPart { part("notes.txt", Array("hello".utf8)) }
        return body + Array("--\(boundary)--\r\n".utf8)
    }

    private static let multipartType = ("Content-Type", "multipart/form-data; boundary=\(boundary)")

    private func expectClose(_ response: RawClient.Response, _ reference: [String: TestTensor], _ context: String) throws {
        #expect(response.statusCode == 200, "\(context): \(response.text)")
        let file = try SafetensorsFile(bytes: response.body)
        #expect(Set(file.tensors.map(\.name)) == Set(reference.keys), "\(context)")
        for tensor in file.tensors {
            let expected = try #require(reference[tensor.name])
            #expect(tensor.shape == expected.shape, "\(context) \(tensor.name)")
            let worst = zip(file.values(of: tensor), expected.values).map { abs($0 - $1) / (abs($1) + 1e-12) }.max() ?? 0
            #expect(worst <= 1e-6, "\(context) \(tensor.name): \(worst)")
        }
    }

    @Test(arguments: DatabaseBackend.available, 0..<3)
    func scaledRoundsInBothFormsMatchTheLiteralReference(_ backend: DatabaseBackend, seed: UInt64) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        var random = SeededGenerator(seed: 600 + seed)
        let clients = TestRound.randomScaled(seed: 500 + seed, dtypes: [.f32, .f64])
        for participant in clients {
            let file = try participant.safetensors().bytes
            let gzip = Bool.random(using: &random)
            let encoding = gzip ? [("Content-Encoding", "gzip")] : []
            let response: RawClient.Response
            if participant.rankPattern.isEmpty && participant.alphaPattern.isEmpty && Bool.random(using: &random) {
                let path =
                    "/v1/federations/fed/rounds/0/uploads/\(participant.id)?rank=\(participant.rank)&weight=\(participant.weight)"
                    + "&lora_alpha=\(participant.loraAlpha!)&use_rslora=\(participant.useRSLoRA)"
                response = try await client.request("PUT", path, headers: encoding, body: gzip ? ContentCoding.gzip.compress(file) : file)
            } else {
                let body = Self.multipart(model: file, config: Self.configJSON(participant))
                response = try await client.request(
                    "PUT", "/v1/federations/fed/rounds/0/uploads/\(participant.id)?weight=\(participant.weight)",
                    headers: encoding + [Self.multipartType], body: gzip ? ContentCoding.gzip.compress(body) : body)
            }
            #expect(response.statusCode == 201, "\(response.text)")
            #expect(response.json["sha256"] as? String == ContentDigest.sha256Hex(file) && response.json["bytes"] as? Int == file.count)
            #expect(response.json["lora_alpha"] as? Double == participant.loraAlpha && response.json["use_rslora"] as? Bool == participant.useRSLoRA)
        }
        let round = try await client.get("/v1/federations/fed/rounds/0")
        let listed = (round.json["uploads"] as? [[String: Any]]) ?? []
        #expect(listed.map { $0["lora_alpha"] as? Double } == clients.sorted { $0.id < $1.id }.map(\.loraAlpha))

        let aggregate = "/v1/federations/fed/rounds/0/aggregate"
        for (strategy, padding) in [("replication", LiteralReference.Padding.replication), ("zero_padding", .zeros)] {
            try expectClose(
                try await client.get("\(aggregate)?strategy=\(strategy)"), LiteralReference.aggregate(clients, padding: padding, target: .global(rank: .max)),
                "global \(strategy)")
            try expectClose(
                try await client.get("\(aggregate)?strategy=\(strategy)&rank=2&lora_alpha=16&use_rslora=true"),
                LiteralReference.aggregate(clients, padding: padding, target: .uniform(rank: 2, loraAlpha: 16, useRSLoRA: true)),
                "rank 2 at lora_alpha 16 with rsLoRA, \(strategy)")
            for participant in clients {
                try expectClose(
                    try await client.get("\(aggregate)/\(participant.id)?strategy=\(strategy)"),
                    LiteralReference.aggregate(clients, padding: padding, target: .client(participant)), "\(participant.id) \(strategy)")
            }
        }
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func refusedUploadsStoreNothingAndSayWhy(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend, arguments: ["--max-upload-bytes", "200000"])
        let client = service.client
        let participant = TestClient(
            id: "alice", rank: 4, weight: 1, dtype: .f32, tensors: TestRound.random(seed: 3, ranks: [4])[0].tensors, loraAlpha: 16)
        let file = try participant.safetensors().bytes
        let path = "/v1/federations/fed/rounds/0/uploads/alice"
        let good = Self.multipart(model: file, config: Self.configJSON(participant))
        #expect(try await client.request("PUT", path, headers: [Self.multipartType], body: good).statusCode == 201)
        let before = try await client.get("/v1/federations/fed/rounds/0")

        let other = try TestRound.random(seed: 4, ranks: [4])[0].safetensors().bytes
        func config(_ json: String) -> [UInt8] { Array(json.utf8) }
        let refusals: [(String, [(String, String)], [UInt8], Int, String)] = [
            ("", [Self.multipartType], Self.multipart(model: other, config: nil), 400, "needs the parts"),
            ("", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":4"#)), 400, "not valid JSON"),
            ("", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":0,"lora_alpha":8}"#)), 422, "r must be"),
            ("", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":8,"lora_alpha":8}"#)), 422, "has rank 8 in the upload's config"),
            (
                "", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":4,"lora_alpha":8,"rank_pattern":{"k_proj":2}}"#)), 422,
                "\"k_proj\" matches no LoRA module"
            ),
            ("?rank=8", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":4,"lora_alpha":8}"#)), 422, "not the config's r"),
            (
                "?lora_alpha=8", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":4,"lora_alpha":8}"#)), 400,
                "from its adapter_config.json"
            ),
            ("", [Self.multipartType], Self.multipart(model: other, config: config(#"{"r":4}"#), extraPart: true), 400, "unexpected multipart part"),
            ("", [("Content-Type", "multipart/form-data")], Self.multipart(model: other, config: config(#"{"r":4}"#)), 400, "boundary"),
            ("", [("Content-Type", "application/json")], other, 415, "multipart/form-data"),
            ("?rank=4&lora_alpha=0", [], other, 400, "lora_alpha"),
            ("?rank=4&use_rslora=yes", [], other, 400, "use_rslora"),
            ("?rank=4", [Self.multipartType], Array(Self.multipart(model: other, config: config(#"{"r":4}"#)).dropLast(10)), 400, "close delimiter"),
            // A model part over the upload limit, sent as is and as a gzip'd bomb (inflated as it arrives, so refused at the limit).
            ("", [Self.multipartType], Self.multipart(model: Array(repeating: 0, count: 200_001), config: config(#"{"r":4}"#)), 413, "exceeds 200000 bytes"),
            (
                "", [Self.multipartType, ("Content-Encoding", "gzip")],
                ContentCoding.gzip.compress(Self.multipart(model: Array(repeating: 0, count: 20_000_000), config: config(#"{"r":4}"#)), level: 9), 413,
                "exceeds 200000 bytes"
            ),
        ]
        for (query, headers, body, status, reason) in refusals {
            let response = try await client.request("PUT", path + query, headers: headers, body: body)
            #expect(response.statusCode == status && response.header("Content-Type") == "application/problem+json", "\(reason): \(response.text)")
            #expect((response.json["detail"] as? String)?.contains(reason) == true, "\(reason): \(response.text)", sourceLocation: #_sourceLocation)
        }
        #expect(try await client.get(path).body == file, "the earlier upload is untouched")
        #expect(try await client.get("/v1/federations/fed/rounds/0").body == before.body)
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func adapterConfigsDescribeTheirDownloads(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        let tensors = { (seed: UInt64, rank: Int) in TestRound.random(seed: seed, ranks: [rank])[0].tensors }
        // alice: r = 8 with q_proj at rank 2; bob: tagged rank 4, lora_alpha 16; carol: r = 16.
        var aliceTensors = tensors(11, 8)
        for module in TestModule.allCases where module == .query {
            for (name, shape) in module.tensors(rank: 2) {
                aliceTensors[name] = TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { Double($0 % 7) / 8 })
            }
        }
        let aliceConfig = Array(
            #"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA", "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}}"#.utf8)
        let aliceFile = try TestClient(id: "alice", rank: 8, weight: 1, dtype: .f32, tensors: aliceTensors).safetensors().bytes
        #expect(
            try await client.request(
                "PUT", "/v1/federations/f/rounds/0/uploads/alice", headers: [Self.multipartType],
                body: Self.multipart(model: aliceFile, config: aliceConfig)
            ).statusCode == 201)
        let bob = try TestClient(id: "bob", rank: 4, weight: 1, dtype: .f32, tensors: tensors(12, 4)).safetensors().bytes
        #expect(try await client.request("PUT", "/v1/federations/f/rounds/0/uploads/bob?rank=4&lora_alpha=16", body: bob).statusCode == 201)
        let carol = try TestClient(id: "carol", rank: 16, weight: 1, dtype: .f32, tensors: tensors(13, 16)).safetensors().bytes
        #expect(try await client.request("PUT", "/v1/federations/f/rounds/0/uploads/carol?rank=16", body: carol).statusCode == 201)

        let configs = "/v1/federations/f/rounds/0/adapter_config"
        #expect(try await client.get("\(configs)/alice").body == aliceConfig, "as sent, byte for byte")
        let bobConfig = try await client.get("\(configs)/bob").json
        #expect(
            bobConfig["r"] as? Int == 4 && bobConfig["lora_alpha"] as? Double == 16 && bobConfig["use_rslora"] as? Bool == false
                && bobConfig["peft_type"] as? String == "LORA")
        #expect(try await client.get("\(configs)/nobody").statusCode == 404)
        #expect(try await client.get("\(configs)?rank=17").statusCode == 422)

        for (query, loraAlpha) in [("", nil), ("?rank=8&lora_alpha=32", 32.0)] as [(String, Double?)] {
            // Each module's rank read off the download itself, by tensor shapes.
            let download = try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/0/aggregate\(query)").body)
            var moduleRanks: [String: Int] = [:]
            for tensor in download.tensors where tensor.name.hasSuffix("lora_A.weight") || tensor.name.hasSuffix("lora_embedding_A") {
                moduleRanks[TestModule.allCases.first { $0.tensors(rank: 1).contains { $0.0 == tensor.name } }!.name!] = tensor.shape[0]
            }
            let config = try await client.get("\(configs)\(query)")
            #expect(config.statusCode == 200 && config.header("Content-Type") == "application/json")
            let json = config.json
            let r = moduleRanks.values.max()!
            #expect(json["r"] as? Int == r && json["target_modules"] as? [String] == ["q_proj"], "alice's config is the base: \(config.text)")
            // Keys are anchored, escaped full module names: unescaped, they name exactly the modules of another rank.
            let rankPattern = (json["rank_pattern"] as? [String: Int]) ?? [:]
            #expect(rankPattern.keys.allSatisfy { $0.hasPrefix("^") && $0.hasSuffix("$") })
            let unescaped = Dictionary(
                uniqueKeysWithValues: rankPattern.map { (String($0.key.dropFirst().dropLast()).replacingOccurrences(of: "\\", with: ""), $0.value) })
            #expect(unescaped == moduleRanks.filter { $0.value != r }, "\(config.text)")
            if let loraAlpha {
                #expect(json["lora_alpha"] as? Double == loraAlpha && (json["alpha_pattern"] as? [String: Any])?.isEmpty == true)
            } else {
                #expect(json["lora_alpha"] as? Int == r && json["use_rslora"] as? Bool == false)
                #expect((json["alpha_pattern"] as? [String: Int]) == rankPattern, "scale 1 in every module: lora_alpha = its rank")
            }
        }
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func theRoundsMaxRankIsItsLargestModuleRank(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        // r = 2, with q_proj raised to 6 by rank_pattern: the round's global rank is 6, not r.
        var tensors = TestRound.random(seed: 31, ranks: [2])[0].tensors
        for (name, shape) in TestModule.query.tensors(rank: 6) {
            tensors[name] = TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { Double($0 % 5) / 4 })
        }
        let participant = TestClient(id: "a", rank: 2, weight: 1, dtype: .f32, tensors: tensors, rankPattern: [("q_proj", 6)])
        let path = "/v1/federations/f/rounds/0/uploads/a"
        let body = Self.multipart(model: try participant.safetensors().bytes, config: Self.configJSON(participant))
        #expect(try await client.request("PUT", path, headers: [Self.multipartType], body: body).statusCode == 201)
        #expect(try await client.get("/v1/federations/f/rounds/0").json["max_rank"] as? Int == 6)
        #expect((try await client.get("/v1/federations/f/rounds").json["rounds"] as? [[String: Any]])?.first?["max_rank"] as? Int == 6)
        let aggregate = try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/0/aggregate").body)
        #expect(aggregate.metadata["rank"] == "6")
        // Replaced by an upload without the pattern, the round's rank follows.
        let plain = try TestClient(id: "a", rank: 3, weight: 1, dtype: .f32, tensors: TestRound.random(seed: 32, ranks: [3])[0].tensors).safetensors()
        #expect(try await client.request("PUT", path + "?rank=3", body: plain.bytes).statusCode == 200)
        #expect(try await client.get("/v1/federations/f/rounds/0").json["max_rank"] as? Int == 3)
        // Scales far outside any PEFT config are refused rather than folded into non-finite sums.
        expectProblem(try await client.request("PUT", path + "?rank=3&lora_alpha=1e300", body: plain.bytes), 422)
        expectProblem(try await client.get("/v1/federations/f/rounds/0/aggregate?lora_alpha=1e-300"), 400)
        #expect(await service.stop() == 0)
    }

    @Test(arguments: DatabaseBackend.available) func withoutAnUploadedConfigTheGlobalConfigNamesTheModules(_ backend: DatabaseBackend) async throws {
        let service = try await ServiceProcess.start(backend)
        let client = service.client
        for (name, seed, rank) in [("a", UInt64(21), 2), ("b", 22, 4)] {
            let file = try TestClient(id: name, rank: rank, weight: 1, dtype: .f32, tensors: TestRound.random(seed: seed, ranks: [rank])[0].tensors)
                .safetensors()
            #expect(try await client.request("PUT", "/v1/federations/f/rounds/0/uploads/\(name)?rank=\(rank)", body: file.bytes).statusCode == 201)
        }
        let download = try SafetensorsFile(bytes: try await client.get("/v1/federations/f/rounds/0/aggregate").body)
        let modules = Set(download.tensors.compactMap { tensor in TestModule.allCases.first { $0.tensors(rank: 1).contains { $0.0 == tensor.name } }?.name })
        let json = try await client.get("/v1/federations/f/rounds/0/adapter_config").json
        // PEFT matches a string target_modules with re.fullmatch against each module's name.
        let targets = try Regex(try #require(json["target_modules"] as? String))
        for module in modules { #expect(module.wholeMatch(of: targets) != nil, "\(module)") }
        #expect("layers.0.attn.k_proj".wholeMatch(of: targets) == nil && "x.\(modules.first!)".wholeMatch(of: targets) == nil)
        #expect(json["r"] as? Int == 4 && json["lora_alpha"] as? Int == 4)
        #expect(await service.stop() == 0)
    }
}
