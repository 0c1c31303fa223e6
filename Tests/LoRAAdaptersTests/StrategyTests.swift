import LoRAAdapters
import TestSupport
import Testing

/// `hetlora` against a literal zero-padded, norm-weighted reference, and `svd`'s contract on random
/// rounds against the dense `M` formed in the test (openapi.yaml, the strategy table).
@Suite struct StrategyTests {
    @Test(arguments: 0..<30)
    func hetloraIsZeroPaddingWeightedByEachUpdatesNorm(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 21_000 + seed)
        let source = try TestRound.source(clients)
        let aggregate = try AdapterAggregator.aggregate(source, options: .init(strategy: .hetlora, dtype: .f64))
        try expectMatches(aggregate.bytes, LiteralReference.aggregate(clients, padding: .normWeighted, target: .global(rank: .max)), tolerance: 1e-9, "hetlora")
        for client in clients.prefix(2) {
            let own = try AdapterAggregator.aggregate(
                source, options: .init(strategy: .hetlora, dtype: .f64, scaling: .client(try client.participant().config)))
            try expectMatches(own.bytes, LiteralReference.aggregate(clients, padding: .normWeighted, target: .client(client)), tolerance: 1e-9, client.id)
        }
    }

    @Test func hetloraFallsBackToUploadWeightsWhenEveryNormIsZero() throws {
        var clients = TestRound.random(seed: 22_000, ranks: [2, 4])
        clients = clients.map { client in
            TestClient(
                id: client.id, rank: client.rank, weight: client.weight, dtype: client.dtype,
                tensors: client.tensors.mapValues { tensor in TestTensor(shape: tensor.shape, values: tensor.values.map { _ in 0 }) })
        }
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: .hetlora, dtype: .f64))
        try expectMatches(aggregate.bytes, LiteralReference.aggregate(clients, padding: .zeros, target: .global(rank: .max)), tolerance: 0, "all zero")
    }

    /// Norms of 0 in some modules only: a module where every update is 0 falls back to upload
    /// weights on its own, and a client whose update is 0 in another module gets weight 0 there
    /// (its A still counts in no slice), while the other modules stay norm-weighted.
    @Test(arguments: 0..<10)
    func hetloraWeighsEachModuleOnItsOwnWhenSomeNormsAreZero(seed: UInt64) throws {
        let clients = TestRound.random(seed: 23_000 + seed, ranks: [2, 3, 4, 8])
        let modules = Set(clients.flatMap { $0.tensors.keys.compactMap(TestModule.name(ofTensor:)) }).sorted()
        try #require(!modules.isEmpty)
        let silent = modules[Int(seed) % modules.count]
        let zeroed = clients.enumerated().map { index, client in
            TestClient(
                id: client.id, rank: client.rank, weight: client.weight, dtype: client.dtype,
                tensors: Dictionary(
                    uniqueKeysWithValues: client.tensors.map { name, tensor in
                        let module = TestModule.name(ofTensor: name)
                        // Every client's B of one module, and the first client's B of every module.
                        let zero = name.contains("lora_B") && (module == silent || index == 0)
                        return (name, zero ? TestTensor(shape: tensor.shape, values: tensor.values.map { _ in 0 }) : tensor)
                    }))
        }
        let aggregate = try AdapterAggregator.aggregate(try TestRound.source(zeroed), options: .init(strategy: .hetlora, dtype: .f64))
        try expectMatches(
            aggregate.bytes, LiteralReference.aggregate(zeroed, padding: .normWeighted, target: .global(rank: .max)), tolerance: 1e-9, "mixed zero norms")
    }

    /// A conv module whose B has kernel axes (`[out, r, kh, kw]`, flattened into B's rows as
    /// openapi.yaml says), and ranks above a module's size (r² > out·kh·kw·in·…, where the norm is
    /// taken from the product rather than r × r Grams larger than it) on a conv and a linear module:
    /// hetlora equals zero padding with each client's weight set to `‖B·A‖_F`, formed here as the
    /// dense `out·kh·kw × in·…` product.
    @Test(arguments: 0..<4, [[2, 3, 5], [2, 9, 40], [1, 3, 30]])
    func hetloraIsZeroPaddingWeightedByTheDenseProductsNorm(seed: UInt64, ranks: [Int]) throws {
        var random = SeededGenerator(seed: 24_000 + seed)
        // [1, 3, 30]: a linear module; the others conv.
        let (out, kernel, columns) = ranks.first == 1 ? (3, [Int](), [2]) : (3, [2, 2], [2, 3])
        let names = ("base_model.model.head.conv.lora_A.weight", "base_model.model.head.conv.lora_B.weight")
        let clients = ranks.enumerated().map { index, rank in
            func tensor(_ shape: [Int]) -> TestTensor {
                TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { _ in Double.random(in: -1...1, using: &random) })
            }
            return TestClient(
                id: "client-\(index)", rank: rank, weight: Double(index + 1), dtype: .f64,
                tensors: [names.0: tensor([rank] + columns), names.1: tensor([out, rank] + kernel)])
        }
        func norm(_ client: TestClient) -> Double {
            let (a, b) = (client.tensors[names.0]!, client.tensors[names.1]!)
            let (rank, n, rest) = (client.rank, columns.reduce(1, *), kernel.reduce(1, *))
            var squares = 0.0
            for o in 0..<out {
                for x in 0..<rest {
                    for c in 0..<n {
                        // B row (o, x), column j: element (o, j, x) of [out, r, rest].
                        let entry = (0..<rank).reduce(0.0) { $0 + b.values[(o * rank + $1) * rest + x] * a.values[$1 * n + c] }
                        squares += entry * entry
                    }
                }
            }
            return squares.squareRoot()
        }
        let normWeighted = clients.map {
            TestClient(id: $0.id, rank: $0.rank, weight: norm($0), dtype: $0.dtype, tensors: $0.tensors)
        }
        let hetlora = try AdapterAggregator.aggregate(try TestRound.source(clients), options: .init(strategy: .hetlora, dtype: .f64))
        let zeroPadding = try AdapterAggregator.aggregate(try TestRound.source(normWeighted), options: .init(strategy: .zeroPadding, dtype: .f64))
        let expected = try SafetensorsFile(bytes: zeroPadding.bytes)
        try expectMatches(
            hetlora.bytes,
            Dictionary(uniqueKeysWithValues: expected.tensors.map { ($0.name, TestTensor(shape: $0.shape, values: expected.values(of: $0))) }),
            tolerance: 1e-12, "ranks \(ranks)")
    }

    /// The module's factors from a downloaded file: B as `out·rest × r` and A as `r × n` (row-major values).
    private static func factors(_ file: SafetensorsFile, module: TestModule) throws -> (b: [[Double]], a: [[Double]]) {
        let names = module.tensors(rank: 1).map(\.0)
        let a = try #require(file.tensor(named: names[0]))
        let b = try #require(file.tensor(named: names[1]))
        let (rank, n) = (a.shape[0], a.shape.dropFirst().reduce(1, *))
        let (out, rest) = (b.shape[0], b.shape.dropFirst(2).reduce(1, *))
        let aValues = file.values(of: a)
        let bValues = file.values(of: b)
        let aRows = (0..<rank).map { Array(aValues[($0 * n)..<(($0 + 1) * n)]) }
        let bColumns = (0..<rank).map { j in (0..<out).flatMap { o in (0..<rest).map { x in bValues[(o * rank + j) * rest + x] } } }
        return (bColumns, aRows)
    }

    /// `M = Σ w·s·B·A / Σ w` of the module, formed densely from the clients' tensors.
    private static func denseUpdate(_ clients: [TestClient], module: TestModule) -> [[Double]]? {
        let names = module.tensors(rank: 1).map(\.0)
        let holders = clients.filter { $0.tensors[names[0]] != nil }
        guard !holders.isEmpty else { return nil }
        let totalWeight = holders.map(\.weight).reduce(0, +)
        var dense: [[Double]]?
        for client in holders {
            let a = client.tensors[names[0]]!
            let b = client.tensors[names[1]]!
            let (rank, n) = (a.shape[0], a.shape.dropFirst().reduce(1, *))
            let (out, rest) = (b.shape[0], b.shape.dropFirst(2).reduce(1, *))
            let scale = client.scale(ofModule: module.name!) * client.weight / totalWeight
            var product = [[Double]](repeating: [Double](repeating: 0, count: n), count: out * rest)
            for o in 0..<out {
                for x in 0..<rest {
                    for j in 0..<rank {
                        let left = b.values[(o * rank + j) * rest + x] * scale
                        for q in 0..<n { product[o * rest + x][q] += left * a.values[j * n + q] }
                    }
                }
            }
            dense = dense.map { sum in zip(sum, product).map { zip($0, $1).map(+) } } ?? product
        }
        return dense
    }

    @Test(arguments: 0..<20)
    func svdFactorsAreBalancedOrderedSignedAndReproduceTheUpdateAtFullRank(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 23_000 + seed)
        let source = try TestRound.source(clients)
        let file = try SafetensorsFile(bytes: AdapterAggregator.aggregate(source, options: .init(strategy: .svd, dtype: .f64)).bytes)
        for module in TestModule.allCases where module.name != nil {
            guard let dense = Self.denseUpdate(clients, module: module) else { continue }
            let (b, a) = try Self.factors(file, module: module)
            var previous = Double.infinity
            var reproduced = [[Double]](repeating: [Double](repeating: 0, count: dense[0].count), count: dense.count)
            for j in b.indices {
                let (bNorm, aNorm) = (b[j].map { $0 * $0 }.reduce(0, +).squareRoot(), a[j].map { $0 * $0 }.reduce(0, +).squareRoot())
                #expect(abs(bNorm - aNorm) <= 1e-9 * max(1, bNorm), "balanced: \(module) component \(j)")
                let sigma = bNorm * aNorm
                #expect(sigma <= previous * (1 + 1e-9), "descending: \(module) component \(j)")
                previous = sigma
                if sigma > 0 {
                    let largest = b[j].indices.max { abs(b[j][$0]) < abs(b[j][$1]) || (abs(b[j][$0]) == abs(b[j][$1]) && $0 > $1) }!
                    #expect(b[j][largest] > 0, "sign rule: \(module) component \(j)")
                } else {
                    #expect(b[j].allSatisfy { $0 == 0 } && a[j].allSatisfy { $0 == 0 }, "past the rank of M: exact zeros")
                }
                for p in dense.indices { for q in dense[p].indices { reproduced[p][q] += b[j][p] * a[j][q] } }
            }
            // At the global rank, which is at least M's rank here, the factors give M back.
            let scale = dense.flatMap { $0 }.map(abs).max() ?? 1
            let error = zip(reproduced, dense).flatMap { zip($0, $1).map { abs($0 - $1) } }.max() ?? 0
            let rankOfM = min(
                dense.count, dense[0].count,
                clients.filter { $0.tensors[module.tensors(rank: 1)[0].0] != nil }.map { $0.rank(ofModule: module.name!) }.reduce(0, +))
            if b.count >= rankOfM { #expect(error <= 1e-9 * max(1, scale), "\(module): product error \(error)") }
        }
    }

    @Test(arguments: 0..<10)
    func svdIsTheSameWhateverTheUploadOrderAndEveryPrefixIsItsTruncation(seed: UInt64) throws {
        let clients = TestRound.randomScaled(seed: 24_000 + seed)
        let adapters = try clients.map { ClientAdapter(participant: try $0.participant(), file: try $0.safetensors()) }
        let forward = try AdapterAggregator.aggregate(InMemoryAdapterSource(adapters), options: .init(strategy: .svd, dtype: .f32))
        let backward = try AdapterAggregator.aggregate(InMemoryAdapterSource(adapters.reversed()), options: .init(strategy: .svd, dtype: .f32))
        #expect(forward.bytes == backward.bytes)
        for rank in 1...forward.globalRank {
            let computed = try AdapterAggregator.aggregate(InMemoryAdapterSource(adapters), options: .init(strategy: .svd, rank: rank, dtype: .f32))
            #expect(try AdapterAggregator.truncate(SafetensorsFile(bytes: forward.bytes), toRank: rank) == computed.bytes, "rank \(rank)")
        }
    }
}
