import AdapterStore
import HTTPServer
import LoRAAdapters

/// Checked path and query parameters of API v1 requests.
struct RequestParameters {
    let request: HTTPRequest
    private let query: [String: String]

    init(_ request: HTTPRequest) throws(ServiceError) {
        self.request = request
        guard let parameters = request.queryParameters() else {
            throw ServiceError(.badRequest, "the query string is not valid percent-encoded UTF-8")
        }
        var query: [String: String] = [:]
        for (name, value) in parameters {
            guard query.updateValue(value, forKey: name) == nil else {
                throw ServiceError(.badRequest, "query parameter '\(name)' is given more than once")
            }
        }
        self.query = query
    }

    /// The federation in the path.
    var federation: FederationID { get throws(ServiceError) { try identifier() } }

    /// The client in the path.
    var client: ClientID { get throws(ServiceError) { try identifier() } }

    /// The path parameter named for the id's kind.
    private func identifier<Kind>() throws(ServiceError) -> Identifier<Kind> {
        guard let id = Identifier<Kind>(rawValue: request.pathParameters[Kind.name] ?? "") else {
            throw ServiceError(.badRequest, "\(Kind.name) ids are 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'")
        }
        return id
    }

    /// The round in the path.
    var round: RoundNumber {
        get throws(ServiceError) {
            guard let round = RoundNumber(request.pathParameters["round"] ?? "") else {
                throw ServiceError(.badRequest, "the round must be a whole number from 0 to 2^53 - 1")
            }
            return round
        }
    }

    func positiveInteger(_ name: String) throws(ServiceError) -> Int? {
        guard let text = query[name] else { return nil }
        guard let value = Int(text), value >= 1, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
            throw ServiceError(.badRequest, "query parameter '\(name)' must be a positive integer, got '\(text)'")
        }
        return value
    }

    func integer(_ name: String) throws(ServiceError) -> Int? {
        guard let text = query[name] else { return nil }
        guard let value = Int(text) else {
            throw ServiceError(.badRequest, "query parameter '\(name)' must be an integer, got '\(text)'")
        }
        return value
    }

    func positiveNumber(_ name: String) throws(ServiceError) -> Double? {
        guard let text = query[name] else { return nil }
        guard let value = Double(text), value.isFinite, value > 0 else {
            throw ServiceError(.badRequest, "query parameter '\(name)' must be a positive finite number, got '\(text)'")
        }
        return value
    }

    func flag(_ name: String) throws(ServiceError) -> Bool? {
        guard let text = query[name] else { return nil }
        guard let value = ["true": true, "false": false][text] else {
            throw ServiceError(.badRequest, "query parameter '\(name)' must be true or false, got '\(text)'")
        }
        return value
    }

    /// The strategy the request names; nil means its federation's.
    var strategy: AggregationStrategy? {
        get throws(ServiceError) {
            guard let text = query["strategy"] else { return nil }
            guard let strategy = AggregationStrategy(rawValue: text) else {
                throw ServiceError(
                    .badRequest, "strategy must be one of \(AggregationStrategy.allCases.map { "'\($0.rawValue)'" }.joined(separator: ", ")), got '\(text)'")
            }
            return strategy
        }
    }

    var outputDType: DType {
        get throws(ServiceError) {
            guard let text = query["dtype"] else { return .f32 }
            guard let dtype = DType(rawValue: text), DType.outputTypes.contains(dtype) else {
                throw ServiceError(.badRequest, "dtype must be F32, F16 or BF16, got '\(text)'")
            }
            return dtype
        }
    }

    /// Whether the query gives any of `names`.
    func givesAny(of names: Set<String>) -> Bool { names.contains { query[$0] != nil } }

    /// Rejects query parameters the endpoint does not define.
    func allowOnly(_ names: Set<String>) throws(ServiceError) {
        if let unknown = query.keys.sorted().first(where: { !names.contains($0) }) {
            throw ServiceError(.badRequest, "unknown query parameter '\(unknown)'")
        }
    }
}
