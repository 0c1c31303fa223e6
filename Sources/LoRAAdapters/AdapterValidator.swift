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
    public static func validate(_ file: SafetensorsFile, declaredRank: Int) throws(AdapterError) -> AdapterSummary {
        guard declaredRank >= 1 else { throw AdapterError(.invalidRank, "the rank tag must be a positive integer, got \(declaredRank)") }
        var factorsByPair: [String: [LoRAFactor: String]] = [:]
        for tensor in file.tensors {
            let role = TensorRole(tensorName: tensor.name)
            if case .lora(let factor, let pairKey) = role {
                guard let rank = role.rank(of: tensor.shape) else {
                    throw AdapterError(
                        .invalidRank, "a LoRA \(factor == .a ? "A" : "B") tensor needs at least 2 axes, its shape is \(tensor.shape)", tensor: tensor.name)
                }
                guard rank == declaredRank else {
                    throw AdapterError(
                        .rankMismatch, "rank \(rank) on axis \(factor.rankAxis) of shape \(tensor.shape), but the upload is tagged rank \(declaredRank)",
                        tensor: tensor.name)
                }
                factorsByPair[pairKey, default: [:]][factor] = tensor.name
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
        return AdapterSummary(rank: declaredRank, tensorCount: file.tensors.count, loraModuleCount: factorsByPair.count)
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
    /// - Parameter existingShape: the shape of `name` in another upload of the round.
    public static func check(name: String, shape: [Int], against existingShape: [Int]) throws(AdapterError) {
        let role = TensorRole(tensorName: name)
        guard role.shape(shape, withRank: 0) == role.shape(existingShape, withRank: 0) else {
            let axisNote = role.factor.map { " apart from rank axis \($0.rankAxis)" } ?? ""
            throw AdapterError(.shapeMismatch, "shape \(shape) disagrees\(axisNote) with shape \(existingShape) in another upload of the round", tensor: name)
        }
    }
}
