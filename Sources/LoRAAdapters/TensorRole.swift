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
            if Self.name(name, endsWith: aSuffix) {
                self = .lora(.a, pairKey: String(Substring(name.utf8.dropLast(aSuffix.utf8.count))) + bSuffix)
                return
            }
            if Self.name(name, endsWith: bSuffix) {
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
            for suffix in [aSuffix, bSuffix] where Self.name(name, endsWith: suffix) {
                var module = name.utf8.dropLast(suffix.utf8.count)
                if module.last == UInt8(ascii: ".") { module = module.dropLast() }
                let prefix = "base_model.model.".utf8
                if module.starts(with: prefix) { module = module.dropFirst(prefix.count) }
                return String(Substring(module))
            }
        }
        return nil
    }

    /// Compared as UTF-8 bytes (code points, as PEFT's Python compares them, and far cheaper than
    /// comparing Characters): every suffix is ASCII, so the cuts fall between code points.
    private static func name(_ name: String, endsWith suffix: String) -> Bool {
        let (bytes, tail) = (name.utf8, suffix.utf8)
        return bytes.count >= tail.count && bytes.suffix(tail.count).elementsEqual(tail)
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
