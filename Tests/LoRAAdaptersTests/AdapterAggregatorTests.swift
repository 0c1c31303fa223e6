import LoRAAdapters
import TestSupport
import Testing

/// Checks every tensor of an aggregate against reference values: same names, shapes, and values
/// within `relativeTolerance` (plus a tiny absolute floor for results that cancel to near zero).
private func expectMatches(
    _ aggregate: AggregatedAdapter, _ reference: [String: TestTensor], relativeTolerance: Double,
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let file = try SafetensorsFile(bytes: aggregate.bytes)
    #expect(Set(file.tensors.map(\.name)) == Set(reference.keys), sourceLocation: sourceLocation)
    for tensor in file.tensors {
        guard let expected = reference[tensor.name] else { continue }
        #expect(tensor.shape == expected.shape, "\(tensor.name)", sourceLocation: sourceLocation)
        let actual = file.values(of: tensor)
        let worst = zip(actual, expected.values).map { abs($0 - $1) / (abs($1) + 1e-12) }.max() ?? 0
        #expect(worst <= relativeTolerance, "\(tensor.name): worst relative error \(worst)", sourceLocation: sourceLocation)
    }
}

@Suite struct AdapterAggregatorTests {
    @Test(arguments: 0..<60)
    func replicationMatchesLiteralPadding(seed: UInt64) throws {
        let clients = TestRound.random(seed: seed)
        let globalRank = clients.map(\.rank).max()!
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: .replication))
        #expect(aggregate.rank == globalRank)
        try expectMatches(aggregate, LiteralReference.aggregate(clients, padding: .replication, rank: globalRank), relativeTolerance: 1e-6)
    }

    @Test(arguments: 0..<60)
    func zeroPaddingMatchesLiteralDefinition(seed: UInt64) throws {
        let clients = TestRound.random(seed: 1000 + seed)
        let globalRank = clients.map(\.rank).max()!
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: .zeroPadding))
        try expectMatches(aggregate, LiteralReference.aggregate(clients, padding: .zeros, rank: globalRank), relativeTolerance: 1e-6)
    }

    @Test(arguments: 0..<20)
    func everyTruncationMatchesTheTruncatedReference(seed: UInt64) throws {
        let clients = TestRound.random(seed: 2000 + seed)
        let source = try TestRound.source(clients)
        // Every client's own rank (what it gets back) and a few others.
        let globalRank = clients.map(\.rank).max()!
        for rank in Set(clients.map(\.rank) + [1, globalRank, (globalRank + 1) / 2]) {
            for (strategy, padding) in [(AggregationStrategy.replication, LiteralReference.Padding.replication), (.zeroPadding, .zeros)] {
                let aggregate = try AdapterAggregator.aggregate(source, options: .init(strategy: strategy, rank: rank))
                #expect(aggregate.rank == rank)
                try expectMatches(aggregate, LiteralReference.aggregate(clients, padding: padding, rank: rank), relativeTolerance: 1e-6)
            }
        }
    }

    @Test(arguments: 0..<20)
    func cuttingAnAggregateToALowerRankEqualsAggregatingAtThatRank(seed: UInt64) throws {
        let clients = TestRound.random(seed: 2500 + seed)
        let source = try TestRound.source(clients)
        let globalRank = clients.map(\.rank).max()!
        for strategy in AggregationStrategy.allCases {
            for dtype in DType.outputTypes {
                let global = try SafetensorsFile(
                    bytes: AdapterAggregator.aggregate(source, options: .init(strategy: strategy, dtype: dtype, metadata: ["round": "7"])).bytes)
                for rank in 1...globalRank {
                    let direct = try AdapterAggregator.aggregate(source, options: .init(strategy: strategy, rank: rank, dtype: dtype, metadata: ["round": "7"]))
                    #expect(try AdapterAggregator.truncate(global, toRank: rank) == direct.bytes, "\(strategy) \(dtype) rank \(rank)")
                }
                #expect(throws: AdapterError.self) { try AdapterAggregator.truncate(global, toRank: globalRank + 1) }
                #expect(throws: AdapterError.self) { try AdapterAggregator.truncate(global, toRank: 0) }
            }
        }
    }

    @Test(arguments: 0..<10)
    func equalRanksMakeBothStrategiesPlainFedAvg(seed: UInt64) throws {
        let rank = TestRound.ranks[Int(seed) % TestRound.ranks.count]
        let clients = TestRound.random(seed: 3000 + seed, ranks: [rank])
        let source = try TestRound.source(clients)
        let replication = try AdapterAggregator.aggregate(source, options: .init(strategy: .replication))
        let zeroPadding = try AdapterAggregator.aggregate(source, options: .init(strategy: .zeroPadding))
        let file = { (bytes: [UInt8]) in try SafetensorsFile(bytes: bytes) }
        #expect(
            try file(replication.bytes).tensors.map { try file(replication.bytes).values(of: $0) }
                == (try file(zeroPadding.bytes).tensors.map { try file(zeroPadding.bytes).values(of: $0) }))

        // FedAvg over the holders of each tensor, written out directly.
        var fedAvg: [String: TestTensor] = [:]
        for name in Set(clients.flatMap(\.tensors.keys)) {
            let holders = clients.filter { $0.tensors[name] != nil }
            let total = holders.map(\.weight).reduce(0, +)
            let values = holders[0].tensors[name]!.values.indices.map { index in
                holders.map { $0.weight * $0.tensors[name]!.values[index] }.reduce(0, +) / total
            }
            fedAvg[name] = TestTensor(shape: holders[0].tensors[name]!.shape, values: values)
        }
        try expectMatches(replication, fedAvg, relativeTolerance: 1e-6)
    }

    @Test(arguments: 0..<10)
    func resultIsBitIdenticalWhateverTheUploadOrder(seed: UInt64) throws {
        var random = SeededGenerator(seed: seed)
        let clients = TestRound.random(seed: 4000 + seed)
        let reference = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(dtype: .f32))
        for _ in 0..<5 {
            let shuffled = try AdapterAggregator.aggregate(try TestRound.source(clients.shuffled(using: &random)), options: .init(dtype: .f32))
            #expect(shuffled.bytes == reference.bytes)
        }
    }

    @Test func aSourceThatBreaksClientOrderIsRefused() throws {
        let clients = ["a", "b"].map { id in
            TestClient(
                id: id, rank: 1, weight: 1, dtype: .f32,
                tensors: [
                    "m.lora_A.weight": TestTensor(shape: [1, 2], values: [1, 2]),
                    "m.lora_B.weight": TestTensor(shape: [2, 1], values: [3, 4]),
                ])
        }
        let source = ReversedSource(wrapped: try TestRound.source(clients))
        let observer = CopyingObserver()
        #expect { try AdapterAggregator.aggregate(source, observer: observer) } throws: { ($0 as? AdapterError)?.code == .inconsistentSource }
        #expect(observer.completions == 1, "the observer is released from the buffer on failure too")
    }

    @Test(arguments: 0..<5, AggregationStrategy.allCases)
    func theObserverIsToldTheSizeFirstAndSeesTheWholeFileInOrder(seed: UInt64, strategy: AggregationStrategy) throws {
        let observer = CopyingObserver()
        let source = RecordingSource(wrapped: try TestRound.source(TestRound.random(seed: 300 + seed)))
        observer.onBegin = { #expect(source.requestedNames.isEmpty, "announced before any tensor was read") }
        let aggregate = try AdapterAggregator.aggregate(source, options: .init(strategy: strategy, dtype: .bf16), observer: observer)
        #expect(observer.bytes == aggregate.bytes && observer.completions == 1)
        #expect(observer.announcedByteCounts == [aggregate.bytes.count])
    }

    @Test(arguments: DType.outputTypes)
    func outputDTypesAreRoundedFromFloat64(dtype: DType) throws {
        let clients = TestRound.random(seed: 77)
        let globalRank = clients.map(\.rank).max()!
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(dtype: dtype))
        let file = try SafetensorsFile(bytes: aggregate.bytes)
        #expect(file.tensors.allSatisfy { $0.dtype == dtype })
        // Half an ulp of the output type, relative.
        let tolerance: Double =
            switch dtype {
            case .f32: 1e-6
            case .f16: 0x1p-11
            default: 0x1p-8
            }
        try expectMatches(aggregate, LiteralReference.aggregate(clients, padding: .replication, rank: globalRank), relativeTolerance: tolerance)
    }

    @Test func metadataNamesFormatStrategyRankAndClients() throws {
        let clients = TestRound.random(seed: 8)
        let aggregate = try AdapterAggregator.aggregate(
            try TestRound.source(clients), options: .init(strategy: .zeroPadding, rank: 1, metadata: ["federation": "fed-a", "round": "3"]))
        let metadata = try SafetensorsFile(bytes: aggregate.bytes).metadata
        #expect(metadata == ["format": "pt", "strategy": "zero_padding", "rank": "1", "clients": String(clients.count), "federation": "fed-a", "round": "3"])
        #expect(aggregate.clientCount == clients.count)
    }

    @Test func slicesNoClientOwnsAreZero() throws {
        // Only the rank-2 client holds q_proj; the round's global rank is 8.
        let low = TestClient(
            id: "a", rank: 2, weight: 1, dtype: .f32,
            tensors: [
                "m.q.lora_A.weight": TestTensor(shape: [2, 3], values: [1, 2, 3, 4, 5, 6]),
                "m.q.lora_B.weight": TestTensor(shape: [2, 2], values: [1, 2, 3, 4]),
            ])
        let high = TestClient(
            id: "b", rank: 8, weight: 3, dtype: .f32,
            tensors: [
                "m.v.lora_A.weight": TestTensor(shape: [8, 1], values: Array(repeating: 1, count: 8)),
                "m.v.lora_B.weight": TestTensor(shape: [1, 8], values: Array(repeating: 1, count: 8)),
            ])
        let file = try SafetensorsFile(bytes: AdapterAggregator.aggregate(try TestRound.source([low, high])).bytes)
        let a = try #require(file.tensor(named: "m.q.lora_A.weight"))
        #expect(a.shape == [8, 3])
        #expect(file.values(of: a) == [1, 2, 3, 4, 5, 6] + Array(repeating: 0, count: 18))
        let b = try #require(file.tensor(named: "m.q.lora_B.weight"))
        #expect(file.values(of: b) == [1, 2, 0, 0, 0, 0, 0, 0, 3, 4, 0, 0, 0, 0, 0, 0])
    }

    @Test func replicationKeepsWhatZeroPaddingDilutes() throws {
        // One rank-4 client among four rank-1 clients, equal weights: slice 3 is owned by one client.
        var clients = (0..<4).map { index in
            TestClient(
                id: "low-\(index)", rank: 1, weight: 1, dtype: .f32,
                tensors: [
                    "m.lora_A.weight": TestTensor(shape: [1, 2], values: [1, 1]),
                    "m.lora_B.weight": TestTensor(shape: [2, 1], values: [1, 1]),
                ])
        }
        clients.append(
            TestClient(
                id: "high", rank: 4, weight: 1, dtype: .f32,
                tensors: [
                    "m.lora_A.weight": TestTensor(shape: [4, 2], values: Array(repeating: 2, count: 8)),
                    "m.lora_B.weight": TestTensor(shape: [2, 4], values: Array(repeating: 2, count: 8)),
                ]))
        let source = try TestRound.source(clients)
        let replicated = try SafetensorsFile(bytes: AdapterAggregator.aggregate(source, options: .init(strategy: .replication)).bytes)
        let zeroPadded = try SafetensorsFile(bytes: AdapterAggregator.aggregate(source, options: .init(strategy: .zeroPadding)).bytes)
        let a = try #require(replicated.tensor(named: "m.lora_A.weight"))
        #expect(replicated.values(of: a) == [1.2, 1.2, 2, 2, 2, 2, 2, 2].map { Double(Float($0)) })
        #expect(zeroPadded.values(of: a) == [1.2, 1.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4].map { Double(Float($0)) })
    }

    @Test func requestsOutsideTheRoundAreRefused() throws {
        let clients = TestRound.random(seed: 9, ranks: [4, 8])
        let source = try TestRound.source(clients)
        let globalRank = clients.map(\.rank).max()!
        for rank in [0, -1, globalRank + 1] {
            #expect { try AdapterAggregator.aggregate(source, options: .init(rank: rank)) } throws: { ($0 as? AdapterError)?.code == .rankOutOfRange }
        }
        #expect { try AdapterAggregator.aggregate(InMemoryAdapterSource([])) } throws: { ($0 as? AdapterError)?.code == .emptyRound }
        let file = try clients[0].safetensors()
        for weight in [0, -1, .infinity, .nan] {
            let round = InMemoryAdapterSource([ClientAdapter(clientID: "x", rank: clients[0].rank, weight: weight, file: file)])
            #expect { try AdapterAggregator.aggregate(round) } throws: { ($0 as? AdapterError)?.code == .invalidWeight }
        }
    }

    @Test func disagreeingShapesAcrossClientsAreRefused() throws {
        let a = TestClient(
            id: "a", rank: 2, weight: 1, dtype: .f32,
            tensors: [
                "m.lora_A.weight": TestTensor(shape: [2, 3], values: Array(repeating: 1, count: 6)),
                "m.lora_B.weight": TestTensor(shape: [4, 2], values: Array(repeating: 1, count: 8)),
            ])
        let b = TestClient(
            id: "b", rank: 1, weight: 1, dtype: .f32,
            tensors: [
                "m.lora_A.weight": TestTensor(shape: [1, 5], values: Array(repeating: 1, count: 5)),
                "m.lora_B.weight": TestTensor(shape: [4, 1], values: Array(repeating: 1, count: 4)),
            ])
        #expect { try AdapterAggregator.aggregate(try TestRound.source([a, b])) } throws: { error in
            let error = error as? AdapterError
            return error?.code == .shapeMismatch && error?.tensor == "m.lora_A.weight"
        }
    }

    @Test func theEngineStreamsOneTensorNameAtATimeInNameOrder() throws {
        let clients = TestRound.random(seed: 10)
        let source = RecordingSource(wrapped: try TestRound.source(clients))
        _ = try AdapterAggregator.aggregate(source)
        #expect(source.requestedNames == Set(clients.flatMap(\.tensors.keys)).sorted())
    }
}

/// Delivers each tensor's contributions in descending client-id order, breaking the protocol.
private struct ReversedSource: AdapterSource {
    let wrapped: InMemoryAdapterSource
    func participants() throws -> [RoundParticipant] { wrapped.participants() }
    func holdings() throws -> [TensorHolding] { wrapped.holdings() }
    func baseTensors() throws -> [BaseTensor] { wrapped.baseTensors() }
    func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws { try wrapped.withBaseTensor(named: tensorName, body) }
    func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        var ids: [String] = []
        try wrapped.forEachContribution(toTensor: tensorName) { ids.append($0.clientID) }
        for id in ids.reversed() {
            try wrapped.forEachContribution(toTensor: tensorName) { if $0.clientID == id { try body($0) } }
        }
    }
}

/// Concatenates the regions it is shown, copying each at once (they are final when shown).
private final class CopyingObserver: AggregationOutputObserver {
    var bytes: [UInt8] = []
    var completions = 0
    var announcedByteCounts: [Int] = []
    var onBegin: () -> Void = {}
    func outputWillBegin(byteCount: Int) {
        #expect(bytes.isEmpty)
        announcedByteCounts.append(byteCount)
        onBegin()
    }
    func regionFinished(_ region: UnsafeRawBufferPointer) { bytes.append(contentsOf: region) }
    func outputComplete() { completions += 1 }
}

/// Records which tensor names the engine asks for, in order.
private final class RecordingSource: AdapterSource {
    let wrapped: InMemoryAdapterSource
    var requestedNames: [String] = []
    init(wrapped: InMemoryAdapterSource) { self.wrapped = wrapped }
    func participants() throws -> [RoundParticipant] { wrapped.participants() }
    func holdings() throws -> [TensorHolding] { wrapped.holdings() }
    func baseTensors() throws -> [BaseTensor] { wrapped.baseTensors() }
    func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws { try wrapped.withBaseTensor(named: tensorName, body) }
    func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        requestedNames.append(tensorName)
        try wrapped.forEachContribution(toTensor: tensorName, body)
    }
}
