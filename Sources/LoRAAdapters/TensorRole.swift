/// Which LoRA factor a tensor is. A carries the rank on axis 0 (`[r, in, ...]`), B on axis 1 (`[out, r, ...]`).
public enum LoRAFactor: Sendable, Hashable {
    case a
    case b

    public var rankAxis: Int { self == .a ? 0 : 1 }
}

/// A tensor's part in a PEFT adapter, decided by its name alone.
public enum TensorRole: Sendable, Hashable {
    /// A LoRA factor; `pairKey` is the same for an A and the B it must be paired with.
    case lora(LoRAFactor, pairKey: String)
    /// Anything else: classifier heads, `modules_to_save`, DoRA magnitudes; averaged whole.
    case dense

    private static let suffixes: [(a: String, b: String)] = [
        ("lora_A.weight", "lora_B.weight"),
        ("lora_embedding_A", "lora_embedding_B"),
    ]

    public init(tensorName name: String) {
        for (aSuffix, bSuffix) in Self.suffixes {
            if name.hasSuffix(aSuffix) {
                self = .lora(.a, pairKey: String(name.dropLast(aSuffix.count)) + bSuffix)
                return
            }
            if name.hasSuffix(bSuffix) {
                self = .lora(.b, pairKey: name)
                return
            }
        }
        self = .dense
    }

    /// The module a LoRA tensor belongs to, as PEFT's patterns match it: the name without the
    /// factor's suffix (and its dot) and without a leading `base_model.model.`; nil for a dense tensor.
    public static func moduleName(ofTensor name: String) -> String? {
        for (aSuffix, bSuffix) in suffixes {
            for suffix in [aSuffix, bSuffix] where name.hasSuffix(suffix) {
                var module = name.dropLast(suffix.count)
                if module.hasSuffix(".") { module = module.dropLast() }
                if module.hasPrefix("base_model.model.") { module = module.dropFirst("base_model.model.".count) }
                return String(module)
            }
        }
        return nil
    }

    public var factor: LoRAFactor? {
        if case .lora(let factor, _) = self { return factor }
        return nil
    }

    /// The tensor's rank read off its shape, or nil for a dense tensor or a shape with too few axes.
    public func rank(of shape: [Int]) -> Int? {
        guard let factor, shape.count >= 2 else { return nil }
        return shape[factor.rankAxis]
    }

    /// The shape with the rank axis replaced by `rank`: what two uploads must agree on apart from rank.
    public func shape(_ shape: [Int], withRank rank: Int) -> [Int] {
        guard let factor, shape.count >= 2 else { return shape }
        var result = shape
        result[factor.rankAxis] = rank
        return result
    }
}
