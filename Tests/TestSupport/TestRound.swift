import LoRAAdapters

/// SplitMix64: a small seeded generator so every random round can be reproduced from its seed.
public struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A tensor as the tests know it: shape and exact values (every value is representable in its dtype).
public struct TestTensor {
    public let shape: [Int]
    public let values: [Double]

    public init(shape: [Int], values: [Double]) {
        self.shape = shape
        self.values = values
    }
}

public struct TestClient {
    public let id: String
    /// The config's `r`: the rank of every module no `rankPattern` key names.
    public let rank: Int
    public let weight: Double
    public let dtype: DType
    public let tensors: [String: TestTensor]
    /// nil: tagged with its rank alone (scale 1).
    public let loraAlpha: Double?
    public let useRSLoRA: Bool
    /// Plain module-name keys (no regular-expression syntax), in the order PEFT would try them.
    public let rankPattern: [(String, Int)]
    public let alphaPattern: [(String, Double)]

    public init(
        id: String, rank: Int, weight: Double, dtype: DType, tensors: [String: TestTensor], loraAlpha: Double? = nil, useRSLoRA: Bool = false,
        rankPattern: [(String, Int)] = [], alphaPattern: [(String, Double)] = []
    ) {
        self.id = id
        self.rank = rank
        self.weight = weight
        self.dtype = dtype
        self.tensors = tensors
        self.loraAlpha = loraAlpha
        self.useRSLoRA = useRSLoRA
        self.rankPattern = rankPattern
        self.alphaPattern = alphaPattern
    }

    /// A plain key names a module when it is the module's name or a dotted tail of it.
    private static func key(_ key: String, names module: String) -> Bool { module == key || module.hasSuffix("." + key) }

    public func rank(ofModule module: String) -> Int { rankPattern.first { Self.key($0.0, names: module) }?.1 ?? rank }

    /// The factor PEFT multiplies this client's `B·A` of `module` by.
    public func scale(ofModule module: String) -> Double {
        let alpha = alphaPattern.first { Self.key($0.0, names: module) }?.1 ?? loraAlpha ?? Double(rank)
        let r = Double(rank(ofModule: module))
        return useRSLoRA ? alpha / r.squareRoot() : alpha / r
    }

    /// The engine's view of this client: its `adapter_config.json` as PEFT writes it.
    public func participant() throws -> RoundParticipant {
        let config = try AdapterConfig(
            rank: rank, loraAlpha: loraAlpha, useRSLoRA: useRSLoRA,
            rankPattern: rankPattern.map { PatternEntry(key: $0.0, value: $0.1) }, alphaPattern: alphaPattern.map { PatternEntry(key: $0.0, value: $0.1) })
        return RoundParticipant(clientID: id, weight: weight, config: config)
    }

    public func safetensors() throws -> SafetensorsFile {
        let records = tensors.map { name, tensor in
            TensorRecord(name: name, dtype: dtype, shape: tensor.shape, data: dtype.encode(tensor.values))
        }
        return try SafetensorsFile(bytes: SafetensorsWriter.write(records, metadata: ["format": "pt"]))
    }
}

/// The modules a random round draws from: linear, conv-shaped, embedding and dense tensors.
public enum TestModule: CaseIterable {
    case query, value, conv, embedding, classifierWeight, classifierBias

    /// Tensor names and shapes for a client of rank `r`.
    public func tensors(rank r: Int) -> [(String, [Int])] {
        switch self {
        case .query: [("base_model.model.layers.0.attn.q_proj.lora_A.weight", [r, 12]), ("base_model.model.layers.0.attn.q_proj.lora_B.weight", [10, r])]
        case .value: [("base_model.model.layers.1.attn.v_proj.lora_A.weight", [r, 9]), ("base_model.model.layers.1.attn.v_proj.lora_B.weight", [7, r])]
        case .conv: [("base_model.model.stem.conv.lora_A.weight", [r, 3, 2, 2]), ("base_model.model.stem.conv.lora_B.weight", [5, r, 1, 1])]
        case .embedding: [("base_model.model.embed_tokens.lora_embedding_A", [r, 11]), ("base_model.model.embed_tokens.lora_embedding_B", [6, r])]
        case .classifierWeight: [("base_model.model.classifier.modules_to_save.default.weight", [4, 6])]
        case .classifierBias: [("base_model.model.classifier.modules_to_save.default.bias", [4])]
        }
    }
}

public enum TestRound {
    public static let ranks = [1, 2, 4, 8, 16, 64]

    /// A random round: 2–9 clients, mixed ranks, weights and dtypes, each holding a random subset of
    /// modules (at least one LoRA module), listed in a random order.
    public static func random(seed: UInt64, ranks: [Int] = ranks, dtypes: [DType] = DType.allCases) -> [TestClient] {
        var random = SeededGenerator(seed: seed)
        let clientCount = Int.random(in: 2...9, using: &random)
        var ids = Set<String>()
        while ids.count < clientCount { ids.insert("client-\(Int.random(in: 0..<1000, using: &random))") }
        return ids.shuffled(using: &random).map { id in
            let rank = ranks.randomElement(using: &random)!
            let dtype = dtypes.randomElement(using: &random)!
            var modules = TestModule.allCases.filter { _ in Bool.random(using: &random) || Bool.random(using: &random) }
            if !modules.contains(where: { ![.classifierWeight, .classifierBias].contains($0) }) { modules.append(.query) }
            var tensors: [String: TestTensor] = [:]
            for module in modules {
                for (name, shape) in module.tensors(rank: rank) {
                    let values = (0..<shape.reduce(1, *)).map { _ in randomValue(for: dtype, using: &random) }
                    tensors[name] = TestTensor(shape: shape, values: values)
                }
            }
            return TestClient(id: id, rank: rank, weight: Double.random(in: 0.1...100, using: &random), dtype: dtype, tensors: tensors)
        }
    }

    /// F32/F64 get full-precision values; F16/BF16 get k/128 with |k| ≤ 255, exact in both.
    public static func randomValue(for dtype: DType, using random: inout SeededGenerator) -> Double {
        switch dtype {
        case .f32: Double(Float.random(in: -1...1, using: &random))
        case .f64: Double.random(in: -1...1, using: &random)
        case .f16, .bf16: Double(Int.random(in: -255...255, using: &random)) / 128
        }
    }

    /// A random round of PEFT-style clients: 2–7 clients with `lora_alpha` from {8, 16, 32} and ranks
    /// from {2, 4, 8, 16}, some with rsLoRA, some with a `rank_pattern` or `alpha_pattern` for one module.
    public static func randomScaled(seed: UInt64, dtypes: [DType] = DType.allCases) -> [TestClient] {
        var random = SeededGenerator(seed: seed)
        let clientCount = Int.random(in: 2...7, using: &random)
        // Keys as users write them: a module's last component, or its whole name.
        let patternKeys: [TestModule: String] = [.query: "q_proj", .value: "layers.1.attn.v_proj", .conv: "conv", .embedding: "embed_tokens"]
        return (0..<clientCount).map { index in
            let rank = [2, 4, 8, 16].randomElement(using: &random)!
            let dtype = dtypes.randomElement(using: &random)!
            var modules = TestModule.allCases.filter { _ in Bool.random(using: &random) || Bool.random(using: &random) }
            if !modules.contains(where: { ![.classifierWeight, .classifierBias].contains($0) }) { modules.append(.query) }
            // A pattern names a module the client holds: one that names none is refused.
            let held = modules.compactMap { patternKeys[$0] }.sorted()
            let rankPattern = Bool.random(using: &random) ? [(held.randomElement(using: &random)!, [1, 2, 3, 8].randomElement(using: &random)!)] : []
            let alphaPattern = Bool.random(using: &random) ? [(held.randomElement(using: &random)!, [4.0, 64].randomElement(using: &random)!)] : []
            let client = TestClient(
                id: "client-\(index)", rank: rank, weight: Double.random(in: 0.1...100, using: &random), dtype: dtype, tensors: [:],
                loraAlpha: [8.0, 16, 32].randomElement(using: &random)!, useRSLoRA: Bool.random(using: &random),
                rankPattern: rankPattern, alphaPattern: alphaPattern)
            var tensors: [String: TestTensor] = [:]
            for module in modules {
                let moduleRank = module.name.map { client.rank(ofModule: $0) } ?? 1
                for (name, shape) in module.tensors(rank: moduleRank) {
                    tensors[name] = TestTensor(shape: shape, values: (0..<shape.reduce(1, *)).map { _ in randomValue(for: dtype, using: &random) })
                }
            }
            return TestClient(
                id: client.id, rank: rank, weight: client.weight, dtype: dtype, tensors: tensors, loraAlpha: client.loraAlpha,
                useRSLoRA: client.useRSLoRA, rankPattern: rankPattern, alphaPattern: alphaPattern)
        }
    }

    public static func source(_ clients: [TestClient]) throws -> InMemoryAdapterSource {
        InMemoryAdapterSource(try clients.map { ClientAdapter(participant: try $0.participant(), file: try $0.safetensors()) })
    }
}

extension TestModule {
    /// The module's name as PEFT's patterns see it (nil for the dense tensors).
    public var name: String? {
        switch self {
        case .query: "layers.0.attn.q_proj"
        case .value: "layers.1.attn.v_proj"
        case .conv: "stem.conv"
        case .embedding: "embed_tokens"
        case .classifierWeight, .classifierBias: nil
        }
    }

    /// The module a tensor name belongs to, by this table (not by the engine's parsing).
    public static func name(ofTensor tensor: String) -> String? {
        allCases.first { module in module.tensors(rank: 1).contains { $0.0 == tensor } }?.name
    }
}

/// The independent reference: padding materialised literally, as the paper and openapi.yaml describe it,
/// with none of the engine's code. A LoRA tensor is sliced along its rank axis by plain index maths.
public enum LiteralReference {
    /// `normWeighted` is HetLoRA's: zero padding with each client's weight replaced, per module, by
    /// the Frobenius norm of its folded update `s·B·A`, formed densely here.
    public enum Padding { case replication, zeros, normWeighted }

    /// What the reference is asked for: ranks and the scale to unfold to.
    public enum Target {
        /// The global adapter at scale 1, each module at min(rank, its global rank).
        case global(rank: Int)
        /// The global adapter, each module at min(rank, its global rank), unfolded to one `lora_alpha`.
        case uniform(rank: Int, loraAlpha: Double, useRSLoRA: Bool)
        /// A client's own adapter: its module ranks and scales.
        case client(TestClient)
    }

    public static func aggregate(_ clients: [TestClient], padding: Padding, rank: Int) -> [String: TestTensor] {
        aggregate(clients, padding: padding, target: .global(rank: rank))
    }

    /// Folds each client's factors by `√s`, pads every client literally up to the module's global
    /// rank (with the owners' aggregate, or, for a slice nobody owns, the base's slice under
    /// replication; or zeros), averages over the holders, cuts to the target rank and divides by
    /// `√s_t`. `base` is the round's base at scale 1; a tensor only it holds is its own (a LoRA
    /// tensor under replication, a dense one always).
    public static func aggregate(_ clients: [TestClient], padding: Padding, target: Target, base: [String: TestTensor] = [:]) -> [String: TestTensor] {
        let names = Set(clients.flatMap(\.tensors.keys)).union(base.keys)
        func baseRank(ofModule module: String) -> Int {
            base.compactMap { name, tensor in TestModule.name(ofTensor: name) == module ? rankAxis(of: name).map { tensor.shape[$0] } : nil }.max() ?? 0
        }
        var result: [String: TestTensor] = [:]
        for name in names {
            let holders = clients.filter { $0.tensors[name] != nil }
            guard let axis = rankAxis(of: name), let module = TestModule.name(ofTensor: name) else {
                guard !holders.isEmpty else {
                    result[name] = base[name]!
                    continue
                }
                let totalWeight = holders.map(\.weight).reduce(0, +)
                let count = holders[0].tensors[name]!.values.count
                var mean = [Double](repeating: 0, count: count)
                for client in holders {
                    for (index, value) in client.tensors[name]!.values.enumerated() { mean[index] += client.weight * value / totalWeight }
                }
                result[name] = TestTensor(shape: holders[0].tensors[name]!.shape, values: mean)
                continue
            }
            let globalRank = max(clients.map { $0.rank(ofModule: module) }.max() ?? 0, baseRank(ofModule: module))
            let norms = padding == .normWeighted ? holders.map { updateNorm(of: $0, module: module) } : []
            let weights = norms.contains(where: { $0 > 0 }) ? norms : holders.map(\.weight)
            let totalWeight = weights.reduce(0, +)
            // Every client's own slices along the rank axis, folded, then each padded up to the global rank.
            let ownSlices = holders.map { client in
                (0..<client.rank(ofModule: module)).map { index in
                    slice(client.tensors[name]!, axis: axis, index: index).map { $0 * client.scale(ofModule: module).squareRoot() }
                }
            }
            let baseSlices = base[name].map { tensor in (0..<tensor.shape[axis]).map { slice(tensor, axis: axis, index: $0) } } ?? []
            let sliceSize = (ownSlices.first?.first ?? baseSlices.first)!.count
            let zeros = [Double](repeating: 0, count: sliceSize)
            let ownerAggregate: [[Double]] = (0..<globalRank).map { j in
                let owners = holders.indices.filter { ownSlices[$0].count > j }
                guard !owners.isEmpty else { return padding == .replication && j < baseSlices.count ? baseSlices[j] : zeros }
                let ownerWeight = owners.map { weights[$0] }.reduce(0, +)
                var aggregate = zeros
                for owner in owners {
                    for (index, value) in ownSlices[owner][j].enumerated() { aggregate[index] += weights[owner] * value / ownerWeight }
                }
                return aggregate
            }
            // With no holder, the global tensor is what every holder would have been padded with.
            var globalSlices = holders.isEmpty ? ownerAggregate : [[Double]](repeating: zeros, count: globalRank)
            for (weight, own) in zip(weights, ownSlices) {
                for j in 0..<globalRank {
                    let padded: [Double] = j < own.count ? own[j] : (padding == .replication ? ownerAggregate[j] : zeros)
                    for index in 0..<sliceSize { globalSlices[j][index] += weight * padded[index] / totalWeight }
                }
            }
            let (targetRank, targetScale): (Int, Double) =
                switch target {
                case .global(let rank): (min(rank, globalRank), 1)
                case .uniform(let rank, let alpha, let rsLoRA):
                    (min(rank, globalRank), rsLoRA ? alpha / Double(min(rank, globalRank)).squareRoot() : alpha / Double(min(rank, globalRank)))
                case .client(let client): (client.rank(ofModule: module), client.scale(ofModule: module))
                }
            var shape = (holders.first?.tensors[name] ?? base[name]!).shape
            shape[axis] = targetRank
            let unfolded = globalSlices.prefix(targetRank).map { $0.map { $0 / targetScale.squareRoot() } }
            result[name] = TestTensor(shape: shape, values: assemble(unfolded, shape: shape, axis: axis))
        }
        return result
    }

    /// `‖s·B·A‖_F` of the client's module, with the dense product formed element by element.
    static func updateNorm(of client: TestClient, module: String) -> Double {
        let names = client.tensors.keys.filter { TestModule.name(ofTensor: $0) == module }
        guard let aName = names.first(where: { rankAxis(of: $0) == 0 }), let bName = names.first(where: { rankAxis(of: $0) == 1 }) else { return 0 }
        let rank = client.rank(ofModule: module)
        let rows = (0..<rank).map { slice(client.tensors[aName]!, axis: 0, index: $0) }
        let columns = (0..<rank).map { slice(client.tensors[bName]!, axis: 1, index: $0) }
        var squares = 0.0
        for p in columns[0].indices {
            for q in rows[0].indices {
                let entry = (0..<rank).reduce(0.0) { $0 + columns[$1][p] * rows[$1][q] }
                squares += entry * entry
            }
        }
        return client.scale(ofModule: module) * squares.squareRoot()
    }

    static func rankAxis(of name: String) -> Int? {
        if name.hasSuffix("lora_A.weight") || name.hasSuffix("lora_embedding_A") { return 0 }
        if name.hasSuffix("lora_B.weight") || name.hasSuffix("lora_embedding_B") { return 1 }
        return nil
    }

    /// Elements whose index along `axis` is `index`, in row-major order.
    static func slice(_ tensor: TestTensor, axis: Int, index: Int) -> [Double] {
        let strides = rowMajorStrides(tensor.shape)
        return tensor.values.indices.filter { ($0 / strides[axis]) % tensor.shape[axis] == index }.map { tensor.values[$0] }
    }

    /// Inverse of `slice` for every index along `axis`.
    static func assemble(_ slices: [[Double]], shape: [Int], axis: Int) -> [Double] {
        let strides = rowMajorStrides(shape)
        var cursors = [Int](repeating: 0, count: slices.count)
        return (0..<shape.reduce(1, *)).map { flat in
            let j = (flat / strides[axis]) % shape[axis]
            defer { cursors[j] += 1 }
            return slices[j][cursors[j]]
        }
    }

    static func rowMajorStrides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        for axis in stride(from: shape.count - 2, through: 0, by: -1) { strides[axis] = strides[axis + 1] * shape[axis + 1] }
        return strides
    }
}
