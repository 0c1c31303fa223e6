/// A parsed Accept-Encoding field (RFC 9110 §12.5.3): the content codings a client accepts in a
/// response, each with its weight.
public struct AcceptEncoding: Sendable, Equatable {
    /// One list element: a coding name (lowercased; `x-gzip` read as `gzip`, RFC 9110 §8.4.1.3) or
    /// `*`, and its weight from 0 (not acceptable) to 1.
    public struct Coding: Sendable, Equatable {
        public let name: String
        public let quality: Double

        public init(name: String, quality: Double) {
            self.name = name
            self.quality = quality
        }
    }

    /// Nil when the request has no Accept-Encoding field (which accepts every coding).
    public let codings: [Coding]?

    /// Every Accept-Encoding field of `headers`, in order. A weight that cannot be read counts as
    /// none given, so the coding keeps the default weight of 1.
    public init(_ headers: HTTPHeaders) {
        guard headers.contains("accept-encoding") else {
            codings = nil
            return
        }
        codings = headers.tokens(for: "accept-encoding").compactMap { element in
            let parts = element.split(separator: ";").map { $0.trimmingASCIIWhitespace() }
            guard let first = parts.first else { return nil }
            let name = first == "x-gzip" ? "gzip" : first
            let quality = parts.dropFirst().first { $0.hasPrefix("q=") }.flatMap { Double($0.dropFirst(2)) } ?? 1
            return Coding(name: name, quality: quality)
        }
    }

    /// The weight of `coding`: its own element's, else that of `*`; unlisted, `identity` is
    /// acceptable (weight 1) unless refused and any other coding is not (0). Every coding weighs
    /// 1 when the field is absent.
    public func quality(of coding: String) -> Double {
        guard let codings else { return 1 }
        let name = coding.lowercasedASCII()
        if let own = codings.first(where: { $0.name == name }) { return own.quality }
        if let any = codings.first(where: { $0.name == "*" }) { return any.quality }
        return name == "identity" ? 1 : 0
    }

    /// True when the client names `coding` itself with a weight above 0, not through `*` or the
    /// absence of the field.
    public func names(_ coding: String) -> Bool {
        let name = coding.lowercasedASCII()
        return codings?.contains { $0.name == name && $0.quality > 0 } ?? false
    }

    /// The acceptable coding of `available` with the highest weight, the earlier one of equal
    /// weights (list them in the server's order of preference); nil when none is acceptable.
    public func preferred(among available: [String]) -> String? {
        var best: (coding: String, quality: Double)?
        for coding in available {
            let quality = quality(of: coding)
            if quality > 0, quality > best?.quality ?? 0 { best = (coding, quality) }
        }
        return best?.coding
    }
}

extension HTTPRequest {
    /// The request's Accept-Encoding fields, parsed.
    public var acceptEncoding: AcceptEncoding { AcceptEncoding(headers) }
}
