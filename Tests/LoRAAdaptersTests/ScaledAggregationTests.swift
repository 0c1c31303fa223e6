import LoRAAdapters
import TestSupport
import Testing

/// Folding and unfolding PEFT scales (openapi.yaml's aggregation semantics, steps 1 and 3), per-module
/// ranks from `rank_pattern`, against the literal reference that pads folded factors by hand.
@Suite struct ScaledAggregationTests {
    @Test(arguments: 0..<40)
    func theGlobalAdapterAtScaleOneMatchesLiteralFoldedPadding(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 7000 + seed)
        let source = try TestRound.source(clients)
        for (strategy, padding) in [(AggregationStrategy.replication, LiteralReference.Padding.replication), (.zeroPadding, .zeros)] {
            let aggregate = try AdapterAggregator.aggregate(source, options: .init(strategy: strategy, dtype: .f64))
            let reference = LiteralReference.aggregate(clients, padding: padding, target: .global(rank: .max))
            try expectMatches(aggregate.bytes, reference, tolerance: 1e-9, "\(strategy)")
        }
    }

    @Test(arguments: 0..<40)
    func eachClientsDownloadIsItsRanksAtItsScales(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 8000 + seed)
        let source = try TestRound.source(clients)
        for client in clients {
            let options = AggregationOptions(dtype: .f64, scaling: .client(try client.participant().config))
            let aggregate = try AdapterAggregator.aggregate(source, options: options)
            try expectMatches(aggregate.bytes, LiteralReference.aggregate(clients, padding: .replication, target: .client(client)), tolerance: 1e-9, client.id)
        }
    }

    @Test(arguments: 0..<20)
    func oneLoraAlphaUnfoldsEachModuleByItsOwnRank(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 9000 + seed)
        let source = try TestRound.source(clients)
        for (rank, loraAlpha, useRSLoRA) in [(16, 16.0, false), (4, 32.0, true), (2, 8.0, false)] {
            let options = AggregationOptions(
                rank: min(rank, try AdapterAggregator.aggregate(source).globalRank), dtype: .f64,
                scaling: .uniform(loraAlpha: loraAlpha, useRSLoRA: useRSLoRA))
            let aggregate = try AdapterAggregator.aggregate(source, options: options)
            let reference = LiteralReference.aggregate(
                clients, padding: .replication, target: .uniform(rank: options.rank!, loraAlpha: loraAlpha, useRSLoRA: useRSLoRA))
            try expectMatches(aggregate.bytes, reference, tolerance: 1e-9, "lora_alpha \(loraAlpha) rank \(rank)")
        }
    }

    /// One rank-20 client and nine rank-5 clients that all learned the same update `ΔW = u·vᵀ`, with
    /// `lora_alpha = 16`: each stores `B[:,0] = u/√s`, `A[0,:] = v/√s`, so that PEFT's `s·B·A = ΔW`.
    /// Raw factors would average to about 0.38× ΔW; folded, the global adapter carries exactly ΔW,
    /// and each client's download applies exactly ΔW at its own scale.
    @Test func clientsThatLearnedTheSameUpdateAgreeOnItAfterFolding() throws {
        func client(_ index: Int, rank: Int) -> TestClient {
            let rootScale = (16 / Double(rank)).squareRoot()
            var a = [Double](repeating: 0, count: rank * 12)
            var b = [Double](repeating: 0, count: 10 * rank)
            a[0] = 1 / rootScale  // A[0][0]
            b[0] = 1 / rootScale  // B[0][0]
            return TestClient(
                id: "c\(index)", rank: rank, weight: 1, dtype: .f64,
                tensors: [
                    "base_model.model.layers.0.attn.q_proj.lora_A.weight": TestTensor(shape: [rank, 12], values: a),
                    "base_model.model.layers.0.attn.q_proj.lora_B.weight": TestTensor(shape: [10, rank], values: b),
                ], loraAlpha: 16)
        }
        let clients = [client(0, rank: 20)] + (1...9).map { client($0, rank: 5) }
        let source = try TestRound.source(clients)
        func appliedUpdate(_ options: AggregationOptions, scale: Double) throws -> Double {
            let file = try SafetensorsFile(bytes: AdapterAggregator.aggregate(source, options: options).bytes)
            let a = file.values(of: file.tensor(named: "base_model.model.layers.0.attn.q_proj.lora_A.weight")!)
            let b = file.values(of: file.tensor(named: "base_model.model.layers.0.attn.q_proj.lora_B.weight")!)
            return scale * b[0] * a[0]
        }
        #expect(abs(try appliedUpdate(.init(dtype: .f64), scale: 1) - 1) < 1e-12, "the global adapter at scale 1")
        for client in clients {
            let update = try appliedUpdate(.init(dtype: .f64, scaling: .client(try client.participant().config)), scale: 16 / Double(client.rank))
            #expect(abs(update - 1) < 1e-12, "\(client.id)'s download, at its own scale")
        }
    }

    @Test(arguments: 0..<10)
    func scaleOneConfigsGiveTheBytesOfRankOnlyUploads(seed: UInt64) throws {
        let clients = TestRound.random(seed: 4000 + seed)
        let rankOnly = InMemoryAdapterSource(try clients.map { ClientAdapter(clientID: $0.id, rank: $0.rank, weight: $0.weight, file: try $0.safetensors()) })
        let explicit = InMemoryAdapterSource(
            try clients.map {
                ClientAdapter(
                    participant: RoundParticipant(clientID: $0.id, weight: $0.weight, config: try AdapterConfig(rank: $0.rank, loraAlpha: Double($0.rank))),
                    file: try $0.safetensors())
            })
        for strategy in AggregationStrategy.allCases {
            for dtype in DType.outputTypes {
                let options = AggregationOptions(strategy: strategy, dtype: dtype)
                #expect(try AdapterAggregator.aggregate(rankOnly, options: options).bytes == AdapterAggregator.aggregate(explicit, options: options).bytes)
            }
        }
    }

    @Test(arguments: 0..<10)
    func cuttingAScaleOneAggregateWithModuleRanksEqualsComputingIt(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 9500 + seed)
        let source = try TestRound.source(clients)
        for dtype in DType.outputTypes {
            let global = try AdapterAggregator.aggregate(source, options: .init(dtype: dtype))
            let file = try SafetensorsFile(bytes: global.bytes)
            for rank in 1...global.globalRank {
                let direct = try AdapterAggregator.aggregate(source, options: .init(rank: rank, dtype: dtype))
                #expect(try AdapterAggregator.truncate(file, toRank: rank) == direct.bytes, "\(dtype) rank \(rank)")
            }
        }
    }

    @Test func aTensorWhoseRankDisagreesWithItsConfigIsRefused() throws {
        let client = TestRound.random(seed: 5, ranks: [4])[0]
        let wrong = ClientAdapter(
            participant: RoundParticipant(clientID: client.id, weight: 1, config: try AdapterConfig(rank: 8)), file: try client.safetensors())
        #expect { try AdapterAggregator.aggregate(InMemoryAdapterSource([wrong])) } throws: { ($0 as? AdapterError)?.code == .inconsistentSource }
    }
}
