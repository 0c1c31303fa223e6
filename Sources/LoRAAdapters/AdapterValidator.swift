/// What an accepted upload holds.
public struct AdapterSummary: Sendable, Equatable {
    public let rank: Int
    public let tensorCount: Int
    /// Number of A/B pairs.
    public let loraModuleCount: Int
}

/// Checks one upload on its own: the rank tag, A/B pairing and finite values. Agreement with the
/// other uploads of a round is checked where the round is known (`RoundShapeCheck`).
public enum AdapterValidator {
    /// An upload tagged with one rank for every module.
    public static func validate(_ file: SafetensorsFile, declaredRank: Int) throws(AdapterError) -> AdapterSummary {
        guard declaredRank >= 1 else { throw AdapterError(.invalidRank, "the rank tag must be a positive integer, got \(declaredRank)") }
        return try validate(file, config: AdapterConfig(unscaledRank: declaredRank))
    }

    /// An upload with its config: every module's tensors have the module's resolved rank, and every
    /// pattern key of the config names at least one module of the file.
    public static func validate(_ file: SafetensorsFile, config: AdapterConfig) throws(AdapterError) -> AdapterSummary {
        try config.checkLoraAlphaRange()
        var factorsByPair: [String: [LoRAFactor: String]] = [:]
        var modules: Set<String> = []
        for tensor in file.tensors {
            let role = TensorRole(tensorName: tensor.name)
            if case .lora(let factor, let pairKey) = role, let module = TensorRole.moduleName(ofTensor: tensor.name) {
                guard let rank = role.rank(of: tensor.shape) else {
                    throw AdapterError(
                        .invalidRank, "a LoRA \(factor == .a ? "A" : "B") tensor needs at least 2 axes, its shape is \(tensor.shape)", tensor: tensor.name)
                }
                let expected = config.rank(ofModule: module)
                guard rank == expected else {
                    throw AdapterError(
                        .rankMismatch,
                        "rank \(rank) on axis \(factor.rankAxis) of shape \(tensor.shape), but module \(module) has rank \(expected) in the upload's config (r or rank_pattern, or the rank tag)",
                        tensor: tensor.name)
                }
                factorsByPair[pairKey, default: [:]][factor] = tensor.name
                modules.insert(module)
            }
            try checkFinite(tensor, in: file)
        }
        guard !factorsByPair.isEmpty else {
            throw AdapterError(
                .unpairedLoRATensor, "the file holds no LoRA tensor (names ending in lora_A.weight, lora_B.weight, lora_embedding_A or lora_embedding_B)")
        }
        for (_, factors) in factorsByPair.sorted(by: { $0.key < $1.key }) where factors.count != 2 {
            let (present, missing) = factors[.a] != nil ? (factors[.a]!, "B") : (factors[.b]!, "A")
            throw AdapterError(.unpairedLoRATensor, "this LoRA tensor has no matching \(missing) tensor", tensor: present)
        }
        if let unmatched = config.patternKeysMatchingNone(of: modules).first {
            throw AdapterError(.invalidConfig, "the pattern key \"\(unmatched)\" matches no LoRA module of the upload (PEFT would ignore it and scale wrongly)")
        }
        return AdapterSummary(rank: config.rank, tensorCount: file.tensors.count, loraModuleCount: factorsByPair.count)
    }

    private static func checkFinite(_ tensor: TensorInfo, in file: SafetensorsFile) throws(AdapterError) {
        let index: Int? = file.withBytes(of: tensor) { bytes in
            guard let base = bytes.baseAddress else { return nil }
            return switch tensor.dtype {
            case .f32: firstNonFinite(base, count: tensor.elementCount, as: F32Codec.self)
            case .f16: firstNonFinite(base, count: tensor.elementCount, as: F16Codec.self)
            case .bf16: firstNonFinite(base, count: tensor.elementCount, as: BF16Codec.self)
            case .f64: firstNonFinite(base, count: tensor.elementCount, as: F64Codec.self)
            }
        }
        if let index {
            let value = file.withBytes(of: tensor) { tensor.dtype.value(in: $0, at: index) }
            throw AdapterError(.nonFiniteValue, "element \(index) is \(value)", tensor: tensor.name)
        }
    }

    private static func firstNonFinite<Codec: ElementCodec>(_ base: UnsafeRawPointer, count: Int, as _: Codec.Type) -> Int? {
        for index in 0..<count where Codec.isNonFinite(base, at: index) { return index }
        return nil
    }
}

/// Agreement between uploads of one round: the same tensor name must have the same shape in every
/// upload apart from the rank axis of LoRA tensors.
public enum RoundShapeCheck {
    /// - Parameters:
    ///   - existingShape: the shape of `name` in another upload of the round.
    ///   - role: the name's role, when the caller has it already.
    public static func check(name: String, shape: [Int], against existingShape: [Int], role: TensorRole? = nil) throws(AdapterError) {
        let role = role ?? TensorRole(tensorName: name)
        guard role.shape(shape, withRank: 0) == role.shape(existingShape, withRank: 0) else {
            let axisNote = role.factor.map { " apart from rank axis \($0.rankAxis)" } ?? ""
            throw AdapterError(.shapeMismatch, "shape \(shape) disagrees\(axisNote) with shape \(existingShape) in another upload of the round", tensor: name)
        }
    }
}
