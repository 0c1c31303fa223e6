/// Handles one request; the body is read (or not) as the handler chooses.
public typealias HTTPHandler = @Sendable (HTTPRequest, HTTPRequestBody) async throws -> HTTPResponse

/// Maps method + path pattern to handlers. Patterns are literal segments and `{name}` segments,
/// which match one non-empty segment and reach the handler percent-decoded in `pathParameters`.
public struct Router: Sendable {
    public struct Route: Sendable {
        public let method: String
        public let pattern: String
        /// Largest request body accepted, in bytes (413 past it).
        public let maxBodyBytes: Int
        let segments: [Segment]
        let handler: HTTPHandler
    }

    enum Segment: Sendable, Equatable {
        case literal(String)
        case parameter(String)
    }

    enum Resolution {
        case matched(Route, parameters: [String: String])
        case notFound
        case methodNotAllowed(allowed: [String])
        case badPath(String)
    }

    public private(set) var routes: [Route] = []
    public let defaultMaxBodyBytes: Int

    public init(defaultMaxBodyBytes: Int = 1 << 20) {
        self.defaultMaxBodyBytes = defaultMaxBodyBytes
    }

    public mutating func add(_ method: String, _ pattern: String, maxBodyBytes: Int? = nil, _ handler: @escaping HTTPHandler) {
        precondition(pattern.hasPrefix("/"), "route patterns start with '/'")
        let segments: [Segment] = pattern.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map { part in
            part.hasPrefix("{") && part.hasSuffix("}") ? .parameter(String(part.dropFirst().dropLast())) : .literal(String(part))
        }
        routes.append(Route(method: method, pattern: pattern, maxBodyBytes: maxBodyBytes ?? defaultMaxBodyBytes, segments: segments, handler: handler))
    }

    func resolve(method: String, path: Substring) -> Resolution {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        var allowed: [String] = []
        var decodeFailure: String?
        for route in routes where route.segments.count == parts.count {
            var parameters: [String: String] = [:]
            var matches = true
            for (segment, part) in zip(route.segments, parts) {
                switch segment {
                case .literal(let literal):
                    matches = part == literal
                case .parameter(let name):
                    guard !part.isEmpty else {
                        matches = false
                        break
                    }
                    guard let decoded = PercentDecoding.decode(part, plusAsSpace: false) else {
                        decodeFailure = "the path segment '\(part)' is not valid percent-encoded UTF-8"
                        matches = false
                        break
                    }
                    parameters[name] = decoded
                }
                if !matches { break }
            }
            guard matches else { continue }
            // HEAD is served by the GET route when there is no HEAD route of its own.
            if route.method == method
                || (method == "HEAD" && route.method == "GET" && !routes.contains { $0.method == "HEAD" && $0.segments == route.segments })
            {
                return .matched(route, parameters: parameters)
            }
            allowed.append(route.method)
            if route.method == "GET" { allowed.append("HEAD") }
        }
        if !allowed.isEmpty { return .methodNotAllowed(allowed: Array(Set(allowed)).sorted()) }
        if let decodeFailure { return .badPath(decodeFailure) }
        return .notFound
    }
}
