import AdapterStore
import Foundation
import HTTPServer
import LoRAAdapters

/// The federation resource (openapi.yaml, "Federation"): its settings and where its rounds stand.
extension AggregatorService {
    func registerFederationRoutes(on routes: inout AuthorizedRoutes) {
        let path = "/v1/federations/{federation}"
        routes.add("PUT", path, .admin, maxBodyBytes: Self.maxSettingsBytes) { [self] in try await putFederation($0, $1) }
        routes.add("GET", path, .federationMember) { [self] request, _ in try await getFederation(request) }
    }

    private static let maxSettingsBytes = 64 * 1024

    private func putFederation(_ request: HTTPRequest, _ body: HTTPRequestBody) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let coding = try Self.contentCoding(of: request)
        let sent = try await body.collect(upTo: Self.maxSettingsBytes)
        let document = coding == .identity ? sent : try ContentDecoding.inflate(sent, coding: coding.rawValue, limit: Self.maxSettingsBytes)
        let settings = try FederationSettingsDocument.settings(from: document)
        let created = try await store.putSettings(settings, federation: federation)
        return .json(created ? .created : .ok, FederationBody(federation: federation, record: try await store.federation(federation)))
    }

    private func getFederation(_ request: HTTPRequest) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        return .json(.ok, FederationBody(federation: federation, record: try await store.federation(federation)))
    }

    /// The strategy a request names, else its federation's.
    func strategy(_ parameters: RequestParameters) async throws -> AggregationStrategy {
        if let strategy = try parameters.strategy { return strategy }
        return try await store.settings(federation: try parameters.federation).strategy
    }
}

/// Federation settings as a client writes them: every member optional, unknown members and values
/// out of range refused with 422 naming the member.
enum FederationSettingsDocument {
    private static let members = ["strategy", "chain", "quorum", "round_timeout_seconds"]
    private static let quorumMembers = ["min_uploads", "grace_seconds", "max_uploads"]
    /// A year: far past any round, and well inside what a deadline's arithmetic holds exactly.
    private static let longestSeconds = 31_536_000.0
    private static let mostUploads = 1_000_000

    static func settings(from body: [UInt8]) throws(ServiceError) -> FederationSettings {
        guard let document = try? JSONDecoder().decode(JSONValue.self, from: Data(body)), case .object(let object) = document else {
            throw ServiceError(.badRequest, "the federation's settings must be a JSON object")
        }
        try refuseUnknown(in: object, known: members, prefix: "")
        var settings = FederationSettings()
        if let value = object["strategy"] {
            guard case .string(let text) = value, let strategy = AggregationStrategy(rawValue: text) else {
                throw invalid("strategy", "one of \(AggregationStrategy.allCases.map { "'\($0.rawValue)'" }.joined(separator: ", "))")
            }
            settings.strategy = strategy
        }
        if let value = object["chain"] {
            guard case .bool(let chain) = value else { throw invalid("chain", "true or false") }
            settings.chain = chain
        }
        if let value = object["quorum"], value != .null {
            guard case .object(let quorum) = value else { throw invalid("quorum", "an object") }
            try refuseUnknown(in: quorum, known: quorumMembers, prefix: "quorum.")
            let minUploads = try integer(quorum["min_uploads"], "quorum.min_uploads")
            let maxUploads = try integer(quorum["max_uploads"], "quorum.max_uploads")
            let grace = try seconds(quorum["grace_seconds"], "quorum.grace_seconds", allowZero: true) ?? 0
            if let minUploads, let maxUploads, maxUploads < minUploads {
                throw invalid("quorum.max_uploads", "at least quorum.min_uploads (\(minUploads))")
            }
            guard minUploads != nil || maxUploads != nil else { throw invalid("quorum", "given min_uploads or max_uploads") }
            settings.quorum = FederationSettings.Quorum(minUploads: minUploads, graceSeconds: grace, maxUploads: maxUploads)
        }
        settings.roundTimeoutSeconds = try seconds(object["round_timeout_seconds"], "round_timeout_seconds", allowZero: false)
        return settings
    }

    private static func refuseUnknown(in object: [String: JSONValue], known: [String], prefix: String) throws(ServiceError) {
        if let unknown = object.keys.sorted().first(where: { !known.contains($0) }) {
            throw ServiceError(.unprocessable, "unknown member '\(prefix)\(unknown)'; the members are \(known.map { prefix + $0 }.joined(separator: ", "))")
        }
    }

    private static func integer(_ value: JSONValue?, _ member: String) throws(ServiceError) -> Int? {
        guard let value, value != .null else { return nil }
        guard case .number(let number) = value, number == number.rounded(), (1...Double(mostUploads)).contains(number) else {
            throw invalid(member, "an integer from 1 to \(mostUploads)")
        }
        return Int(number)
    }

    private static func seconds(_ value: JSONValue?, _ member: String, allowZero: Bool) throws(ServiceError) -> Double? {
        guard let value, value != .null else { return nil }
        guard case .number(let number) = value, number <= longestSeconds, allowZero ? number >= 0 : number > 0 else {
            throw invalid(member, "a number of seconds \(allowZero ? "from 0" : "above 0") to \(Int(longestSeconds))")
        }
        return number
    }

    private static func invalid(_ member: String, _ expected: String) -> ServiceError {
        ServiceError(.unprocessable, "'\(member)' must be \(expected)")
    }
}

/// Any JSON value, for reading documents whose members are checked one by one.
enum JSONValue: Decodable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let bool = try? container.decode(Bool.self) {
            self = .bool(bool)
        } else if let number = try? container.decode(Double.self) {
            self = .number(number)
        } else if let string = try? container.decode(String.self) {
            self = .string(string)
        } else if let array = try? container.decode([JSONValue].self) {
            self = .array(array)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }
}

struct FederationBody: Encodable {
    struct Settings: Encodable {
        struct Quorum: Encodable {
            @NullWhenAbsent var minUploads: Int?
            let graceSeconds: Double
            @NullWhenAbsent var maxUploads: Int?
        }

        let strategy: String
        let chain: Bool
        @NullWhenAbsent var quorum: Quorum?
        @NullWhenAbsent var roundTimeoutSeconds: Double?
    }

    let federation: FederationID
    let settings: Settings
    let currentRound: RoundNumber
    let rounds: Int

    init(federation: FederationID, record: FederationRecord) {
        self.federation = federation
        let settings = record.settings
        self.settings = Settings(
            strategy: settings.strategy.rawValue, chain: settings.chain,
            quorum: settings.quorum.map { Settings.Quorum(minUploads: $0.minUploads, graceSeconds: $0.graceSeconds, maxUploads: $0.maxUploads) },
            roundTimeoutSeconds: settings.roundTimeoutSeconds)
        currentRound = record.currentRound
        rounds = record.rounds
    }
}
