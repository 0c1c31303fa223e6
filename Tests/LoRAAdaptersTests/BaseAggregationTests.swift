import LoRAAdapters
import TestSupport
import Testing

/// Rounds with a base (openapi.yaml, aggregation semantics: a slice no upload owns is the base's
/// under replication, zeros under zero padding; a dense tensor only the base holds is the base's),
/// against the literal reference padding by hand.
@Suite struct BaseAggregationTests {
    /// Low-rank clients and a base of a higher rank holding a random subset of the modules, so that
    /// some slices, some modules and some dense tensors have no holder but the base.
    private static func round(seed: UInt64, scaled: Bool = false) throws -> (clients: [TestClient], base: [String: TestTensor], source: InMemoryAdapterSource) {
        var random = SeededGenerator(seed: seed)
        let clients = scaled ? TestRound.randomScaled(seed: seed) : TestRound.random(seed: seed, ranks: [1, 2, 4])
        let baseRank = [2, 8, 16].randomElement(using: &random)!
        var base: [String: TestTensor] = [:]
        for module in TestModule.allCases where Bool.random(using: &random) || module == .embedding {
            for (name, shape) in module.tensors(rank: baseRank) {
                base[name] = TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { _ in TestRound.randomValue(for: .f32, using: &random) })
            }
        }
        let baseFile = try TestClient(id: "base", rank: baseRank, weight: 1, dtype: .f32, tensors: base).safetensors()
        let adapters = try clients.map { ClientAdapter(participant: try $0.participant(), file: try $0.safetensors()) }
        return (clients, base, InMemoryAdapterSource(adapters, base: baseFile))
    }

    @Test(arguments: 0..<40)
    func theGlobalAdapterTakesUnownedSlicesFromTheBase(seed: UInt64) throws {
        let (clients, base, source) = try Self.round(seed: 11_000 + seed)
        for (strategy, padding) in [(AggregationStrategy.replication, LiteralReference.Padding.replication), (.zeroPadding, .zeros)] {
            let aggregate = try AdapterAggregator.aggregate(source, options: .init(strategy: strategy, dtype: .f64))
            try expectMatches(
                aggregate.bytes, LiteralReference.aggregate(clients, padding: padding, target: .global(rank: .max), base: base), tolerance: 1e-9, "\(strategy)")
        }
    }

    @Test(arguments: 0..<20)
    func scaledClientsDownloadsAndOneLoraAlphaWithABase(seed: UInt64) throws {
        let (clients, base, source) = try Self.round(seed: 12_000 + seed, scaled: true)
        for client in clients {
            let aggregate = try AdapterAggregator.aggregate(source, options: AggregationOptions(dtype: .f64, scaling: .client(try client.participant().config)))
            try expectMatches(
                aggregate.bytes, LiteralReference.aggregate(clients, padding: .replication, target: .client(client), base: base), tolerance: 1e-9, client.id)
        }
        let globalRank = try AdapterAggregator.aggregate(source).globalRank
        let options = AggregationOptions(rank: min(4, globalRank), dtype: .f64, scaling: .uniform(loraAlpha: 16, useRSLoRA: true))
        let reference = LiteralReference.aggregate(
            clients, padding: .replication, target: .uniform(rank: min(4, globalRank), loraAlpha: 16, useRSLoRA: true), base: base)
        try expectMatches(try AdapterAggregator.aggregate(source, options: options).bytes, reference, tolerance: 1e-9, "lora_alpha 16, rsLoRA")
    }

    @Test(arguments: 0..<10)
    func everyLowerRankIsACutOfTheGlobalAdapter(seed: UInt64) throws {
        let (_, _, source) = try Self.round(seed: 13_000 + seed)
        let global = try AdapterAggregator.aggregate(source, options: .init(dtype: .bf16))
        for rank in 1...global.globalRank {
            let computed = try AdapterAggregator.aggregate(source, options: .init(rank: rank, dtype: .bf16))
            #expect(try AdapterAggregator.truncate(SafetensorsFile(bytes: global.bytes), toRank: rank) == computed.bytes, "rank \(rank)")
        }
    }

    @Test func aRoundWithOnlyABaseAggregatesToTheBase() throws {
        let (_, base, _) = try Self.round(seed: 14_000)
        let file = try TestClient(id: "base", rank: 1, weight: 1, dtype: .f32, tensors: base).safetensors()
        let aggregate = try AdapterAggregator.aggregate(InMemoryAdapterSource([], base: file), options: .init(dtype: .f32))
        let result = try SafetensorsFile(bytes: aggregate.bytes)
        #expect(result.tensors.map(\.name) == file.tensors.map(\.name))
        for tensor in result.tensors { #expect(result.values(of: tensor) == file.values(of: file.tensor(named: tensor.name)!), "\(tensor.name)") }
        #expect(throws: AdapterError.self) { try AdapterAggregator.aggregate(InMemoryAdapterSource([]), options: .init()) }
    }

    @Test func aBaseWhoseShapeDisagreesIsRefused() throws {
        let clients = TestRound.random(seed: 15_000, ranks: [2])
        let name = clients[0].tensors.keys.first { $0.hasSuffix("lora_B.weight") || $0.hasSuffix("lora_embedding_B") }!
        var shape = clients[0].tensors[name]!.shape
        shape[0] += 1
        let base = try TestClient(
            id: "base", rank: 2, weight: 1, dtype: .f32, tensors: [name: TestTensor(shape: shape, values: Array(repeating: 0.5, count: shape.reduce(1, *)))]
        ).safetensors()
        let source = InMemoryAdapterSource(try clients.map { ClientAdapter(participant: try $0.participant(), file: try $0.safetensors()) }, base: base)
        #expect(throws: AdapterError.self) { try AdapterAggregator.aggregate(source, options: .init()) }
    }
}
