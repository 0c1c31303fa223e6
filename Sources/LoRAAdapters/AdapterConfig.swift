import Foundation

/// One `rank_pattern` or `alpha_pattern` member; the members keep the order they were sent in,
/// since PEFT takes the first key that matches.
public struct PatternEntry<Value: Sendable & Equatable>: Sendable, Equatable {
    public let key: String
    public let value: Value

    public init(key: String, value: Value) {
        self.key = key
        self.value = value
    }
}

/// What a PEFT `LoraConfig` (`adapter_config.json`) decides about each module: its rank `r` and its
/// scale `s = lora_alpha / r` (`/ √r` with rsLoRA), with `rank_pattern` / `alpha_pattern` overriding
/// `r` / `lora_alpha` for the modules their keys match, as PEFT resolves them.
public struct AdapterConfig: Sendable, Equatable {
    public let rank: Int
    public let loraAlpha: Double
    public let useRSLoRA: Bool
    public let rankPattern: [PatternEntry<Int>]
    public let alphaPattern: [PatternEntry<Double>]

    /// A config as the query parameters give it: one rank and one `lora_alpha` for every module
    /// (`lora_alpha` defaults to the rank, which is scale 1).
    public init(
        rank: Int, loraAlpha: Double? = nil, useRSLoRA: Bool = false,
        rankPattern: [PatternEntry<Int>] = [], alphaPattern: [PatternEntry<Double>] = []
    ) throws(AdapterError) {
        guard rank >= 1 else { throw AdapterError(.invalidConfig, "r must be a positive integer, not \(rank)") }
        let loraAlpha = loraAlpha ?? Double(rank)
        guard loraAlpha > 0, loraAlpha.isFinite else { throw AdapterError(.invalidConfig, "lora_alpha must be positive and finite, not \(loraAlpha)") }
        for entry in rankPattern where entry.value < 1 {
            throw AdapterError(.invalidConfig, "rank_pattern[\"\(entry.key)\"] must be a positive integer, not \(entry.value)")
        }
        for entry in alphaPattern where !(entry.value > 0 && entry.value.isFinite) {
            throw AdapterError(.invalidConfig, "alpha_pattern[\"\(entry.key)\"] must be positive and finite, not \(entry.value)")
        }
        self.rank = rank
        self.loraAlpha = loraAlpha
        self.useRSLoRA = useRSLoRA
        self.rankPattern = rankPattern
        self.alphaPattern = alphaPattern
        matchers = try Self.matchers(for: rankPattern.map(\.key) + alphaPattern.map(\.key))
    }

    /// The `lora_alpha` values accepted. Far wider than any PEFT config in use, and narrow enough
    /// that folding and unfolding finite F32 factors stay finite in the Float64 sums.
    public static let loraAlphaRange: ClosedRange<Double> = 1e-6...1e6

    public static func checkLoraAlpha(_ value: Double, field: String) throws(AdapterError) {
        guard loraAlphaRange.contains(value) else {
            throw AdapterError(.invalidConfig, "\(field) must be a number from 1e-6 to 1e6, not \(value)")
        }
    }

    /// Every `lora_alpha` of the config within `loraAlphaRange`: checked on the way in (uploads and
    /// bases), not when a stored config is read back, so rounds stored before the bound still aggregate.
    public func checkLoraAlphaRange() throws(AdapterError) {
        try Self.checkLoraAlpha(loraAlpha, field: "lora_alpha")
        for entry in alphaPattern { try Self.checkLoraAlpha(entry.value, field: "alpha_pattern[\"\(entry.key)\"]") }
    }

    /// Scale 1 for every module at `rank` (`lora_alpha = r`): an upload tagged with its rank alone.
    /// Not validated: the engine refuses a rank below 1 where it meets it.
    public init(unscaledRank rank: Int) {
        self.rank = rank
        loraAlpha = Double(rank)
        useRSLoRA = false
        rankPattern = []
        alphaPattern = []
        matchers = [:]
    }

    /// Compiled pattern keys, by key; not part of the value.
    private let matchers: [String: PatternKey]

    public static func == (lhs: AdapterConfig, rhs: AdapterConfig) -> Bool {
        lhs.rank == rhs.rank && lhs.loraAlpha == rhs.loraAlpha && lhs.useRSLoRA == rhs.useRSLoRA
            && lhs.rankPattern == rhs.rankPattern && lhs.alphaPattern == rhs.alphaPattern
    }

    /// Every module has scale 1 (`lora_alpha = r` for each, no rsLoRA): folding changes nothing.
    public var isUnscaled: Bool {
        !useRSLoRA && rankPattern.isEmpty && alphaPattern.isEmpty && loraAlpha == Double(rank)
    }

    /// The module's rank: the first `rank_pattern` key that matches it, else `r`.
    public func rank(ofModule module: String) -> Int {
        rankPattern.first { matchers[$0.key]!.matches(module) }?.value ?? rank
    }

    /// The module's `lora_alpha`: the first `alpha_pattern` key that matches it, else `lora_alpha`.
    public func alpha(ofModule module: String) -> Double {
        alphaPattern.first { matchers[$0.key]!.matches(module) }?.value ?? loraAlpha
    }

    /// The factor PEFT multiplies the module's `B·A` by.
    public func scale(ofModule module: String) -> Double {
        Self.scale(alpha: alpha(ofModule: module), rank: rank(ofModule: module), useRSLoRA: useRSLoRA)
    }

    public static func scale(alpha: Double, rank: Int, useRSLoRA: Bool) -> Double {
        useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank)
    }

    /// The pattern keys that match none of `modules`: PEFT only warns about them, and a silently
    /// ignored pattern is how wrong scales happen, so uploads refuse them.
    public func patternKeysMatchingNone(of modules: some Collection<String>) -> [String] {
        (rankPattern.map(\.key) + alphaPattern.map(\.key)).filter { key in !modules.contains { matchers[key]!.matches($0) } }
    }

    /// `LoraConfig.lora_alpha` when a config leaves it out.
    static let peftDefaultLoraAlpha = 8.0

    /// Pattern keys are regular expressions matched by backtracking, so their number and length are
    /// bounded (a real config has one key per module, each a module name or a short expression).
    static let maxPatternKeys = 4096
    static let maxPatternKeyLength = 256

    private static func matchers(for keys: [String]) throws(AdapterError) -> [String: PatternKey] {
        guard keys.count <= maxPatternKeys else {
            throw AdapterError(.invalidConfig, "rank_pattern and alpha_pattern have \(keys.count) keys; at most \(maxPatternKeys) are accepted")
        }
        var matchers: [String: PatternKey] = [:]
        for key in keys where matchers[key] == nil {
            guard key.utf8.count <= maxPatternKeyLength else {
                throw AdapterError(.invalidConfig, "pattern key \"\(key.prefix(32))…\" is longer than \(maxPatternKeyLength) bytes")
            }
            guard let matcher = PatternKey(key) else {
                throw AdapterError(.invalidConfig, "pattern key \"\(key)\" is not a valid regular expression")
            }
            matchers[key] = matcher
        }
        return matchers
    }
}

/// A `rank_pattern` / `alpha_pattern` key as PEFT applies it: key `K` matches module name `N` when
/// `(.*\.)?(K)$` matches all of `N`. Keys are regular expressions; a plain name matches itself and
/// any module whose name ends in `.` + it.
private struct PatternKey: @unchecked Sendable {
    // @unchecked: NSRegularExpression is immutable once made and documented as safe to share.
    private let expression: NSRegularExpression

    init?(_ key: String) {
        guard !key.isEmpty, let expression = try? NSRegularExpression(pattern: "^(.*\\.)?(\(key))$") else { return nil }
        self.expression = expression
    }

    func matches(_ module: String) -> Bool {
        expression.firstMatch(in: module, range: NSRange(module.startIndex..., in: module)) != nil
    }
}

extension AdapterConfig {
    /// Reads the members that decide ranks and scales from `adapter_config.json`; others (target
    /// modules, dropout, …) are PEFT's business. Duplicate keys are refused, pattern order is kept.
    public init(json bytes: [UInt8]) throws(AdapterError) {
        let parsed = bytes.withUnsafeBytes { raw in Result { () throws(AdapterError) in try HeaderJSON.parse(raw) } }
        let document: HeaderJSON
        switch parsed {
        case .success(let value): document = value
        case .failure(let error): throw AdapterError(.malformedConfig, "adapter_config.json is not valid JSON: \(error.message)")
        }
        guard case .object(let members) = document else {
            throw AdapterError(.malformedConfig, "adapter_config.json must be a JSON object, not \(document.typeName)")
        }
        var byKey: [String: HeaderJSON] = [:]
        for member in members {
            guard byKey.updateValue(member.value, forKey: member.key) == nil else {
                throw AdapterError(.malformedConfig, "adapter_config.json has the member \"\(member.key)\" twice")
            }
        }
        if let type = byKey["peft_type"], type != .string("LORA") {
            throw AdapterError(.invalidConfig, "peft_type must be \"LORA\"")
        }
        guard let rankValue = byKey["r"] else { throw AdapterError(.invalidConfig, "r is missing") }
        try self.init(
            rank: try Self.positiveInteger(rankValue, field: "r"),
            // Absent, it is what PEFT's LoraConfig defaults to, not r.
            loraAlpha: try byKey["lora_alpha"].map { value throws(AdapterError) in try Self.number(value, field: "lora_alpha") } ?? Self.peftDefaultLoraAlpha,
            useRSLoRA: try Self.flag(byKey["use_rslora"], field: "use_rslora"),
            rankPattern: try Self.pattern(byKey["rank_pattern"], field: "rank_pattern") { value, field throws(AdapterError) in
                try AdapterConfig.positiveInteger(value, field: field)
            },
            alphaPattern: try Self.pattern(byKey["alpha_pattern"], field: "alpha_pattern") { value, field throws(AdapterError) in
                try AdapterConfig.number(value, field: field)
            })
    }

    private static func positiveInteger(_ value: HeaderJSON, field: String) throws(AdapterError) -> Int {
        guard let integer = value.nonNegativeInteger, integer >= 1 else {
            throw AdapterError(.invalidConfig, "\(field) must be a positive integer")
        }
        return integer
    }

    private static func number(_ value: HeaderJSON, field: String) throws(AdapterError) -> Double {
        guard case .number(let text) = value, let number = Double(text), number > 0, number.isFinite else {
            throw AdapterError(.invalidConfig, "\(field) must be a positive finite number")
        }
        return number
    }

    private static func flag(_ value: HeaderJSON?, field: String) throws(AdapterError) -> Bool {
        switch value {
        case nil, .null?: return false
        case .bool(let flag)?: return flag
        default: throw AdapterError(.invalidConfig, "\(field) must be true or false")
        }
    }

    private static func pattern<Value>(
        _ value: HeaderJSON?, field: String, _ read: (HeaderJSON, String) throws(AdapterError) -> Value
    ) throws(AdapterError) -> [PatternEntry<Value>] {
        switch value {
        case nil, .null?:
            return []
        case .object(let members)?:
            var entries: [PatternEntry<Value>] = []
            for member in members {
                entries.append(PatternEntry(key: member.key, value: try read(member.value, "\(field)[\"\(member.key)\"]")))
            }
            return entries
        default:
            throw AdapterError(.invalidConfig, "\(field) must be an object mapping module patterns to numbers")
        }
    }
}
