import Foundation

/// The `adapter_config.json` files that load the service's downloads with `PeftModel.from_pretrained`
/// (openapi.yaml, "adapter_config").
extension AdapterConfig {
    /// `{"peft_type": "LORA", "r", "lora_alpha", "use_rslora"}`: the config of an upload that sent none.
    public var minimalJSON: [UInt8] {
        Array(
            HeaderJSON.object([
                ("peft_type", .string("LORA")), ("r", .number(String(rank))), ("lora_alpha", HeaderJSON.number(loraAlpha)),
                ("use_rslora", .bool(useRSLoRA)),
            ]).serialized.utf8)
    }

    /// The config of a global adapter whose modules have `moduleRanks`: `base` (a client's config as
    /// it sent it, members kept in order) with `r` the largest rank, `rank_pattern` giving every
    /// module of another rank its own, and the scale: at scale 1 (`loraAlpha` nil) `lora_alpha = r`
    /// and `alpha_pattern` giving those modules their rank; otherwise the asked `lora_alpha` /
    /// `use_rslora` and no `alpha_pattern`. Pattern keys are `^escaped name$`: PEFT matches a key
    /// `K` against `(.*\.)?(K)$`, so a bare name would also catch every module whose name ends in
    /// `.` + it. Without a base, `target_modules` names exactly the modules, so the config loads.
    public static func globalJSON(
        base: [UInt8]?, moduleRanks: [String: Int], loraAlpha: Double?, useRSLoRA: Bool
    ) throws(AdapterError) -> [UInt8] {
        let rank = moduleRanks.values.max() ?? 1
        var members: [(key: String, value: HeaderJSON)] = [
            ("peft_type", .string("LORA")),
            ("target_modules", .string("^(?:" + moduleRanks.keys.sorted().map { NSRegularExpression.escapedPattern(for: $0) }.joined(separator: "|") + ")$")),
        ]
        if let base {
            let parsed = base.withUnsafeBytes { raw in Result { () throws(AdapterError) in try HeaderJSON.parse(raw) } }
            if case .success(.object(let baseMembers)) = parsed { members = baseMembers }
        }
        let others = moduleRanks.filter { $0.value != rank }.sorted { $0.key < $1.key }
        let pattern = { (value: (String, Int) -> HeaderJSON) in
            HeaderJSON.object(others.map { ("^" + NSRegularExpression.escapedPattern(for: $0.key) + "$", value($0.key, $0.value)) })
        }
        let replacements: [(String, HeaderJSON)] = [
            ("r", .number(String(rank))),
            ("lora_alpha", HeaderJSON.number(loraAlpha ?? Double(rank))),
            ("use_rslora", .bool(loraAlpha == nil ? false : useRSLoRA)),
            ("rank_pattern", pattern { _, rank in .number(String(rank)) }),
            ("alpha_pattern", loraAlpha == nil ? pattern { _, rank in .number(String(rank)) } : .object([])),
        ]
        for (key, value) in replacements {
            if let index = members.firstIndex(where: { $0.key == key }) {
                members[index].value = value
            } else {
                members.append((key, value))
            }
        }
        return Array(HeaderJSON.object(members).serialized.utf8)
    }
}
